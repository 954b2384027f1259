"""How fast one kernel can read B bytes that are not in L2, by how its loads are issued (GPU machine).

Times, in the kernel bench's harness (a CUDA graph of back-to-back calls rotating over copies beyond
4x L2; median per call), read-only kernels from stream.cu over the byte counts of INT4 g128 decode
layers: each thread issuing U 16-byte loads before using any (``regs``), or one thread per block bulk-
copying (TMA) its chunk into shared memory (``bulk``). The best of them is the floor a decode kernel can
reach on this card; the gap to it is what the kernels' math and layout cost.

    PYTHONPATH=src python benchmarks/probes/stream_probe.py     # writes benchmarks/results/stream-<card>.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

from libortho.eval.bench_kernels import _copies, card_name, copy_bandwidth, time_rotating

HERE = Path(__file__).parent
SIZES = {"1024x4096": 1024 * 4096 // 2, "4096x4096": 4096 * 4096 // 2, "11008x4096": 11008 * 4096 // 2,
         "4096x14336": 4096 * 14336 // 2}


def configs():
    for threads in (128, 256):
        for u in (2, 4, 8, 16):
            yield f"regs t{threads} u{u}", ("regs", threads, u)
    for chunk in (16 << 10, 32 << 10, 64 << 10):
        for piece in (4 << 10, chunk):
            yield f"bulk t128 c{chunk >> 10}k p{piece >> 10}k", ("bulk", 128, chunk, piece)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/stream-<card>.json)")
    ap.add_argument("--replays", type=int, default=15)
    args = ap.parse_args()
    ext = load(name="libortho_stream_probe", sources=[str(HERE / "stream_binding.cpp"), str(HERE / "stream.cu")],
               extra_cuda_cflags=["-O3", "-gencode=arch=compute_90a,code=sm_90a"], verbose=False)
    copy = copy_bandwidth() / 1e9
    out = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")
    one = torch.zeros(1, device="cuda")
    rows = []
    for name, nbytes in SIZES.items():
        bufs = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda") for _ in range(_copies(nbytes))]
        calls = max(2 * len(bufs), 24)
        floor = time_rotating([lambda: one.add_(1)], args.replays, calls)
        print(f"{name}: {nbytes / 1e6:.2f} MB, floor {floor:.2f} us, ideal above floor {nbytes / copy / 1e3:.2f} us", flush=True)
        for label, cfg in configs():
            if cfg[0] == "regs":
                fns = [lambda b=b: ext.regs(b, cfg[1], cfg[2], out) for b in bufs]
            else:
                fns = [lambda b=b: ext.bulk(b, cfg[1], cfg[2], cfg[3], out) for b in bufs]
            assert fns[0]() == 0, label
            us = time_rotating(fns, args.replays, calls)
            gbps = nbytes / max(us - floor, 1e-3) / 1e3
            rows.append({"size": name, "bytes": nbytes, "config": label, "us": us, "floor_us": floor,
                         "GBps_above_floor": gbps})
            print(f"  {label:<24} {us:7.2f} us   {gbps:6.0f} GB/s above floor", flush=True)
    Path(args.out or f"benchmarks/results/stream-{card_name()}.json").write_text(json.dumps({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                                          "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                          "copy_GBps": copy, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
