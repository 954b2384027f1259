"""Decode attention alone (GPU machine): LibOrtho's decode_attention against torch's SDPA as transformers calls it
for a static cache (bool mask over the whole cache), the 7B shape (32 heads of 128) and SmolLM2's (9 on 3 of 64),
the cache filled to several lengths. CUDA graphs of calls rotating through copies of the cache beyond L2, replayed
in turn (bench_kernels.time_interleaved); the bytes of K and V the filled positions hold over the time, next to them.

    PYTHONPATH=src python benchmarks/probes/decode_attention.py --out benchmarks/results/decode-attention-<card>.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math

import torch
import torch.nn.functional as F

import libortho.ops  # noqa: F401
from libortho.eval.bench_kernels import _copies, time_interleaved
from libortho.ops import cuda as cuda_ops

SHAPES = {"llama2-7b": (32, 32, 128), "smollm2": (9, 3, 64)}  # query heads, cache heads, head dim


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="*", default=list(SHAPES))
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    p.add_argument("--cache-len", type=int, default=392)
    p.add_argument("--filled", type=int, nargs="*", default=[129, 256, 384])
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--out", default="decode-attention.json")
    a = p.parse_args()
    assert cuda_ops.build(), cuda_ops._state["error"]
    rows = []
    for model in a.models:
        hq, hkv, d = SHAPES[model]
        for b in a.batches:
            kv_bytes = 2 * b * hkv * a.cache_len * d * 2
            copies = _copies(kv_bytes)
            q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
            caches = [(torch.randn(b, hkv, a.cache_len, d, device="cuda", dtype=torch.bfloat16),
                       torch.randn(b, hkv, a.cache_len, d, device="cuda", dtype=torch.bfloat16)) for _ in range(copies)]
            for n in a.filled:
                mask = (torch.arange(a.cache_len, device="cuda") < n).view(1, 1, 1, -1).expand(b, 1, 1, -1)
                scale = 1 / math.sqrt(d)
                g = hq // hkv

                def sdpa(k, v):
                    kk, vv = (k, v) if g == 1 else (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))
                    return lambda: F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale)

                def ours(k, v):
                    return lambda: torch.ops.libortho.decode_attention(q, k, v, mask, scale)
                calls = max(2 * copies, 24)
                t_sdpa, t_ours = time_interleaved([[sdpa(k, v) for k, v in caches], [ours(k, v) for k, v in caches]],
                                                  a.replays, calls)
                filled_bytes = 2 * b * hkv * n * d * 2
                row = {"model": model, "batch": b, "cache_len": a.cache_len, "filled": n, "sdpa_us": t_sdpa,
                       "libortho_us": t_ours, "speedup": t_sdpa / t_ours,
                       "filled_GBps_libortho": filled_bytes / t_ours / 1e3, "cache_GBps_sdpa": kv_bytes / t_sdpa / 1e3}
                rows.append(row)
                print(f"{model} b={b} filled {n}/{a.cache_len}: SDPA {t_sdpa:.2f} us, LibOrtho {t_ours:.2f} us "
                      f"({row['speedup']:.2f}x; {row['filled_GBps_libortho']:.0f} GB/s of filled K and V)", flush=True)
    json.dump({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "method": __doc__,
               "rows": rows}, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
