"""Where the time of a decode call goes, without hardware counters (GPU machine; run before tuning).

For each shape at M = 1, in the kernel bench's harness (CUDA graph of back-to-back calls rotating
through weight copies beyond 4x L2, median per call), it times:

* ``floor``: a one-element kernel, the cost of one graph node (launch, ramp, drain) with no bytes;
* ``read``: ``torch.sum`` over the packed INT4 weight, how fast a stock reduction streams those bytes;
* ``bf16`` (``F.linear``), torch's int4 kernel, and LibOrtho base-only for each decode kernel (and v1
  with programmatic dependent launch, ``LIBORTHO_PDL=1``).

and reports each one's time above the floor and its bandwidth over its bytes there, next to the copy
bandwidth. A kernel whose time above the floor is far from bytes / copy bandwidth is short of bytes in
flight; one near it that is still slow pays the floor. Also fits bf16 time = a + bytes / b over the
shapes (the harness's per-call intercept). Writes ``--out`` (JSON).

    PYTHONPATH=src python benchmarks/kernel_probe.py --out /tmp/out/probe.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from libortho.eval.bench_kernels import (_clone_layer, _copies, _layer_bytes, _layer_call, _ortho_layer,
                                         _torch_int4, card_name, copy_bandwidth, time_rotating)
from libortho.ops import cuda as cuda_ops

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (1024, 4096)]


def probe_shape(n: int, k: int, replays: int, variants: tuple) -> dict:
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    base = _ortho_layer(w, 4, 128, 0.0)
    nq, nw = _copies(_layer_bytes(base, 0)), _copies(n * k * 2)
    calls = max(2 * nq, 2 * nw, 24)
    bases = [base] + [_clone_layer(base) for _ in range(nq - 1)]
    ws = [w] + [w.clone() for _ in range(nw - 1)]
    one = torch.zeros(1, device="cuda")
    t = {"floor": time_rotating([lambda: one.add_(1)], replays, calls),
         "read": time_rotating([lambda b=b: b.qweight.sum() for b in bases], replays, calls),
         "bf16": time_rotating([lambda wi=wi: F.linear(x, wi) for wi in ws], replays, calls)}
    nbytes = {"read": base.qweight.numel() * 4, "bf16": n * k * 2, "torch_int4": n * k // 2 + n * (k // 128) * 4}
    int4 = _torch_int4(w, 128, x)
    if int4 is not None:
        packs = [int4[0]] + [int4[0].clone() for _ in range(nq - 1)]
        t["torch_int4"] = time_rotating([lambda p=p: torch.ops.aten._weight_int4pack_mm(x, p, 128, int4[1])
                                         for p in packs], replays, calls)
    caller_pdl = os.environ.get("LIBORTHO_PDL")
    try:
        os.environ["LIBORTHO_PDL"] = "0"  # plain launches, whatever the caller's environment
        for v in variants:
            cuda_ops.set_decode_kernel(v)
            t[f"libortho_{v}"] = time_rotating([_layer_call(b, x, 0.0) for b in bases], replays, calls)
            nbytes[f"libortho_{v}"] = _layer_bytes(base, 0)
        if "v1" in variants:  # the same with programmatic dependent launch (LIBORTHO_PDL=1)
            cuda_ops.set_decode_kernel("v1")
            os.environ["LIBORTHO_PDL"] = "1"
            t["libortho_v1_pdl"] = time_rotating([_layer_call(b, x, 0.0) for b in bases], replays, calls)
            nbytes["libortho_v1_pdl"] = _layer_bytes(base, 0)
    finally:
        if caller_pdl is None:
            os.environ.pop("LIBORTHO_PDL", None)
        else:
            os.environ["LIBORTHO_PDL"] = caller_pdl
        cuda_ops.set_decode_kernel(None)
    return {"N": n, "K": k, "M": 1, "us": t, "bytes": nbytes}


def report(rows: list[dict], copy_gbps: float) -> str:
    out = [f"copy bandwidth {copy_gbps:.0f} GB/s; per call: us, us above floor, GB/s over the bytes above floor, "
           "ideal us above floor (bytes / copy bandwidth)"]
    for r in rows:
        floor = r["us"]["floor"]
        out.append(f"{r['N']}x{r['K']}  floor {floor:.2f} us")
        for key, us in r["us"].items():
            if key == "floor":
                continue
            b = r["bytes"].get(key)
            above = us - floor
            bw = f"{b / max(above, 1e-3) / 1e3:7.0f} GB/s" if b else ""
            ideal = f"ideal {b / copy_gbps / 1e3:6.2f}" if b else ""
            out.append(f"  {key:<14} {us:7.2f} us  above floor {above:6.2f}  {bw}  {ideal}")
    xs = [(r["bytes"]["bf16"], r["us"]["bf16"]) for r in rows]
    if len(xs) >= 2:
        mx = sum(b for b, _ in xs) / len(xs)
        my = sum(u for _, u in xs) / len(xs)
        slope = sum((b - mx) * (u - my) for b, u in xs) / sum((b - mx) ** 2 for b, _ in xs)
        out.append(f"bf16 fit: {my - slope * mx:.2f} us + bytes / {1e-3 / slope:.0f} GB/s")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/probe-<card>.json)")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--variants", nargs="*", default=list(cuda_ops.DECODE_KERNELS))
    args = ap.parse_args()
    assert cuda_ops.build(), cuda_ops._state["error"]
    copy_gbps = copy_bandwidth() / 1e9
    rows = [probe_shape(n, k, args.replays, tuple(args.variants)) for n, k in SHAPES]
    text = report(rows, copy_gbps)
    print(text, flush=True)
    out = Path(args.out or f"benchmarks/results/probe-{card_name()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                               "copy_GBps": copy_gbps, "rows": rows, "report": text}, indent=1))


if __name__ == "__main__":
    main()
