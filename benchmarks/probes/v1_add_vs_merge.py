"""Probe (GPU machine): at M 17-32 with alpha 1, v1's base + the ortho add (fused_small_m) against the merge path
(dequant_merge + cuBLAS) and the GEMM + ortho add (gemm_int4), per Llama shape and ortho density, each checked against
float64 (v1) and timed in the kernel bench's harness (graphs over weight copies beyond 4x L2, replayed in turn).
It sets the rule of ops/cuda.py use_v1_wide for calls with an ortho stream in play.

    PYTHONPATH=src python benchmarks/probes/v1_add_vs_merge.py   # writes $OUT (default benchmarks/results)/v1-add-vs-merge-<card>-m17-32.json
"""
import datetime as dt
import json
import os
import sys

import torch
import torch.nn.functional as F
sys.path.insert(0, "src")
from libortho.eval.bench_kernels import _ortho_layer, _clone_layer, _copies, _layer_bytes, card_name, time_interleaved
from libortho.ops import cuda as C

assert C.build(), C._state["error"]
ext = C.extension()
rows = []
for n, k in [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336), (1024, 4096)]:
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    for d in (0.005, 0.01, 0.02, 0.05):
        base = _ortho_layer(w, 4, 128, d)
        nq = _copies(_layer_bytes(base, 1.0))
        layers = [base] + [_clone_layer(base) for _ in range(nq - 1)]
        calls = max(2 * nq, 24)
        for m in (17, 24, 32):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            a = lambda L: (L.qweight, L.scales, L.zeros, L.row_ptr, L.col_idx, L.values)  # noqa: E731
            v1 = [lambda L=L: ext.fused_small_m(x, *a(L), None, 1.0, 4, 128, n, k, 0) for L in layers]
            merge = [lambda L=L: F.linear(x, ext.dequant_merge(x, *a(L), 1.0, 4, 128, n, k)[0]) for L in layers]
            gemm = [lambda L=L: ext.gemm_int4(x, *a(L), None, 1.0, 4, 128, n, k) for L in layers]
            ref = F.linear(x.double(), (base.base_weight().double() + base.ortho().to_dense().double()))
            err = float((ext.fused_small_m(x, *a(base), None, 1.0, 4, 128, n, k, 0)[0].double() - ref).norm() / ref.norm())
            t = time_interleaved([v1, merge, gemm], 10, calls)
            r = {"N": n, "K": k, "M": m, "density": d, "nnz": base.ortho_nnz, "v1_add_us": t[0], "merge_us": t[1],
                 "gemm_add_us": t[2], "v1_rel_err": err,
                 "policy": "v1" if C.use_v1_wide("auto", m, base.ortho_nnz * m, n * k) else "merge"}
            rows.append(r)
            print(f"{n}x{k} M={m} d={d}: v1+add {t[0]:.2f} merge {t[1]:.2f} gemm+add {t[2]:.2f} (policy {r['policy']}, err {err:.1e})", flush=True)
out = os.environ.get("OUT", "benchmarks/results")
json.dump({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "rows": rows},
          open(f"{out}/v1-add-vs-merge-{card_name()}-m17-32.json", "w"), indent=1)
