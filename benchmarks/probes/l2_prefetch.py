"""Probe of the L2 prefetch chain (libortho.prefetch, GPU machine): does a launch that asks L2 to fetch the
next launch's weights make that next launch faster when a gap (the small kernels between two layers)
separates them?

Each step runs A (the producer), a busy-wait kernel of ``gap`` us (torch.cuda._sleep) and B (the
consumer), on the decode kernel at M rows; one CUDA graph cycles through copies of (A, B) beyond 4x L2, so
that nothing but the prefetch puts B in L2. The same steps with and without the chain are timed in
interleaved graphs (median per step), next to the gap alone and to A and B alone.

``--residency`` times what the chain could at best give: each B shape cold (copies beyond 4x L2 in
turn) and warm (one copy called again and again, its bytes in L2 where they fit), bf16 F.linear beside it.

    PYTHONPATH=src python benchmarks/probes/l2_prefetch.py   # writes benchmarks/results/l2-prefetch-<card>.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import torch

from libortho.eval.bench_kernels import _clone_layer, _copies, _layer_bytes, _ortho_layer, card_name, time_interleaved
from libortho.layer import run_packed
from libortho.ops import cuda as cuda_ops

PAIRS = [((12288, 4096), (4096, 4096)),    # q/k/v -> o_proj (Llama-2-7B)
         ((4096, 4096), (22016, 4096)),    # o_proj -> gate/up
         ((22016, 4096), (4096, 11008)),   # gate/up -> down_proj
         ((4096, 11008), (12288, 4096))]   # down_proj -> the next block's q/k/v


def cycles_per_us() -> float:
    """The busy-wait kernel's clock: cycles of torch.cuda._sleep per microsecond, measured."""
    torch.cuda._sleep(1000)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    torch.cuda._sleep(2_000_000)
    e.record()
    torch.cuda.synchronize()
    return 2_000_000 / (s.elapsed_time(e) * 1e3)


def link(a, b, max_mb):
    object.__setattr__(a, "_l2_next", b)
    object.__setattr__(a, "_l2_bytes", int(max_mb * 2 ** 20))


def unlink(a):
    a.__dict__.pop("_l2_next", None)
    a.__dict__.pop("_l2_bytes", None)


def residency(args) -> None:
    """Cold (rotating copies) and warm (one copy repeated) times of each B shape, LibOrtho and bf16."""
    import torch.nn.functional as F
    rows = []
    for _, (n, k) in PAIRS:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        lay = _ortho_layer(w, 4, 128, args.density)
        copies = _copies(_layer_bytes(lay, 1.0))
        lays = [lay] + [_clone_layer(lay) for _ in range(copies - 1)]
        ws = [w] + [w.clone() for _ in range(_copies(n * k * 2) - 1)]
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"N": n, "K": k, "M": m, "int4_mb": _layer_bytes(lay, 0.0) / 2 ** 20}
            for alpha in (0.0, 1.0):
                cold, warm = time_interleaved([[lambda a=a: run_packed(a, x, alpha) for a in lays],
                                               [lambda: run_packed(lay, x, alpha)]], args.replays, 2 * copies)
                row[f"alpha{alpha:g}_cold_us"], row[f"alpha{alpha:g}_warm_us"] = cold, warm
            cold, warm = time_interleaved([[lambda wi=wi: F.linear(x, wi) for wi in ws], [lambda: F.linear(x, w)]],
                                          args.replays, 2 * len(ws))
            row["bf16_cold_us"], row["bf16_warm_us"] = cold, warm
            rows.append(row)
            print(f"{n}x{k} M={m} ({row['int4_mb']:.1f} MB INT4): alpha0 cold {row['alpha0_cold_us']:.2f} warm "
                  f"{row['alpha0_warm_us']:.2f} us; alpha1 cold {row['alpha1_cold_us']:.2f} warm "
                  f"{row['alpha1_warm_us']:.2f}; bf16 cold {cold:.2f} warm {warm:.2f}", flush=True)
    out = Path(args.out or f"benchmarks/results/l2-residency-{card_name()}.json")
    out.write_text(json.dumps({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                               "density": args.density, "method": residency.__doc__, "rows": rows}, indent=1))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--m", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--gaps", type=float, nargs="*", default=[0, 5, 10, 20])
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--max-mb", type=float, default=24.0)
    ap.add_argument("--replays", type=int, default=15)
    ap.add_argument("--residency", action="store_true", help="only the cold / warm times of the B shapes")
    args = ap.parse_args()
    assert cuda_ops.build(), cuda_ops._state["error"]
    if args.residency:
        return residency(args)
    cpu = cycles_per_us()
    rows = []
    for (na, ka), (nb, kb) in PAIRS:
        a0 = _ortho_layer(torch.randn(na, ka, device="cuda", dtype=torch.bfloat16) * 0.02, 4, 128, args.density)
        b0 = _ortho_layer(torch.randn(nb, kb, device="cuda", dtype=torch.bfloat16) * 0.02, 4, 128, args.density)
        copies = _copies(_layer_bytes(a0, 1.0) + _layer_bytes(b0, 1.0))
        pairs = [(a0, b0)] + [(_clone_layer(a0), _clone_layer(b0)) for _ in range(copies - 1)]
        for m in args.m:
            xa = torch.randn(m, ka, device="cuda", dtype=torch.bfloat16)
            xb = torch.randn(m, kb, device="cuda", dtype=torch.bfloat16)
            for alpha in (0.0, 1.0):
                for gap in args.gaps:
                    cyc = int(gap * cpu)

                    def step(a, b):
                        def f():
                            run_packed(a, xa, alpha)
                            if cyc:
                                torch.cuda._sleep(cyc)
                            run_packed(b, xb, alpha)
                        return f
                    fns = [step(a, b) for a, b in pairs]
                    plain = time_interleaved([fns], args.replays, 2 * copies)[0]
                    for a, b in pairs:
                        link(a, b, args.max_mb)
                    chained = time_interleaved([fns], args.replays, 2 * copies)[0]
                    for a, _ in pairs:
                        unlink(a)
                    sleep = time_interleaved([[lambda: torch.cuda._sleep(cyc)]], args.replays, 2 * copies)[0] if cyc else 0.0
                    only = time_interleaved([[lambda a=a: run_packed(a, xa, alpha) for a, _ in pairs],
                                             [lambda b=b: run_packed(b, xb, alpha) for _, b in pairs]],
                                            args.replays, 2 * copies)
                    row = {"A": [na, ka], "B": [nb, kb], "M": m, "alpha": alpha, "gap_us": gap, "sleep_us": sleep,
                           "plain_us": plain, "chained_us": chained, "A_us": only[0], "B_us": only[1],
                           "saved_us": plain - chained}
                    rows.append(row)
                    print(f"{na}x{ka} -> {nb}x{kb} M={m} alpha={alpha:g} gap {gap:g} us (sleep {sleep:.2f}): "
                          f"plain {plain:.2f} us, chained {chained:.2f} us, saved {plain - chained:+.2f} us "
                          f"(A {only[0]:.2f}, B {only[1]:.2f})", flush=True)
    out = Path(args.out or f"benchmarks/results/l2-prefetch-{card_name()}.json")
    out.write_text(json.dumps({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                               "density": args.density, "max_mb": args.max_mb, "method": __doc__.strip(),
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
