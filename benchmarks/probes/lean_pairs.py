"""Lean vs full v1 ring kernels, alpha 0, in pairs timed in turn (GPU machine).

    PYTHONPATH=src python benchmarks/probes/lean_pairs.py time        # configurations 13/14/16 (ortho first), 9, 8
    PYTHONPATH=src python benchmarks/probes/lean_pairs.py ncu 16      # 3 full then 3 lean calls, 4096x11008 M = 4

(The 2026-11-29 calls ran an earlier copy of this script with the same calls.) The ortho-first configurations only run lean when v1.cuh's launch_v1_ring allows it: for the 2026-11-29 runs
(results/logs/lean-ortho-first-H200.log, ncu in results/ncu/ncu-v1-cfg16-lean-vs-full-4096x11008-m4-H200.txt)
the call patched `!Cfg::kOrthoFirst && ` out of that line on the GPU machine first; without the patch their
pairs time the same kernel twice (results/logs/lean-ortho-first-off-H200.log: the noise floor).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from v1_configs import call  # noqa: E402
from libortho.eval.bench_kernels import _clone_layer, _copies, _layer_bytes, _ortho_layer, time_rotating  # noqa: E402
from libortho.ops import cuda  # noqa: E402


def time_pairs(ext) -> None:
    """Per shape and M, each configuration full then lean, twice, in turn; the best of each printed."""
    for n, k in [(4096, 4096), (4096, 11008)]:
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        base = _ortho_layer(w, 4, 128, 0.01)
        nq = _copies(_layer_bytes(base, 1.0))
        layers = [base] + [_clone_layer(base) for _ in range(nq - 1)]
        for m in (1, 4, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = []
            for cfg in [c for c in (13, 14, 16, 9, 8) if m <= cuda.V1_CONFIG_MAX_M[c]]:
                t = {False: [], True: []}
                for lean in (False, True, False, True):
                    ext.set_v1_lean(lean)
                    t[lean].append(time_rotating([lambda lay=lay: call(ext, lay, x, 0.0, cfg) for lay in layers], 15, 2 * nq))
                out.append(f"cfg{cfg} full {min(t[False]):.2f} lean {min(t[True]):.2f}")
            print(f"{n}x{k} M={m}: " + "; ".join(out), flush=True)


def ncu_calls(ext, cfg: int) -> None:
    """Three full then three lean calls of one configuration (for ncu --launch-skip 2 --launch-count 2)."""
    w = (torch.randn(4096, 11008, device="cuda") * 0.02).to(torch.bfloat16)
    lay = _ortho_layer(w, 4, 128, 0.01)
    x = torch.randn(4, 11008, device="cuda", dtype=torch.bfloat16)
    for lean in (False, True):
        ext.set_v1_lean(lean)
        for _ in range(3):
            call(ext, lay, x, 0.0, cfg)
    torch.cuda.synchronize()


if __name__ == "__main__":
    assert cuda.build(), cuda._state["error"]
    if sys.argv[1] == "time":
        time_pairs(cuda.extension())
    else:
        ncu_calls(cuda.extension(), int(sys.argv[2]))
