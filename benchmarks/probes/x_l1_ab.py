"""x's ring tiles through L1 or not (LIBORTHO_V1_X_L1), A/B in one process: python benchmarks/probes/x_l1_ab.py OUT.json.
The setting is read when a call is captured, so graphs captured with v1_x_l1_max_m = 0 and = 2 replay in turn
(time_interleaved): alpha 1 at M 1-4 over 0.5-5 %, M = 4 (untouched by the setting) and alpha 0 (x_l1 needs an ortho
stream) as null controls."""
import sys
import torch
from libortho.eval.bench_kernels import (_clone_layer, _copies, _layer_bytes, _layer_call, _ortho_layer,
                                         time_interleaved, write_probe_results)
from libortho.ops import cuda

ext = cuda.extension()
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336), (1024, 4096))
rows = []
for n, k in SHAPES:
    w = torch.randn(n, k, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0)).mul_(0.02).to(torch.bfloat16)
    for d in (0.005, 0.01, 0.02, 0.05):
        lay = _ortho_layer(w, 4, 128, d)
        nq = _copies(_layer_bytes(lay, 1))
        cps = [lay] + [_clone_layer(lay) for _ in range(nq - 1)]
        for m in (1, 2, 4):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

            def group(setting, alpha):
                def one(c):
                    f = _layer_call(c, x, alpha)
                    return lambda: (ext.set_v1_x_l1_max_m(setting), f())
                return [one(c) for c in cps]
            t = time_interleaved([group(0, 1.0), group(2, 1.0), group(0, 0.0), group(2, 0.0)], 15, max(2 * nq, 24))
            ext.set_v1_x_l1_max_m(cuda.V1_X_L1_DEFAULT)
            rows.append({"N": n, "K": k, "M": m, "density": d, "a1_off_us": t[0], "a1_l1_us": t[1],
                         "a0_off_us": t[2], "a0_l1_us": t[3]})
            print(f"{n}x{k} M={m} d={d}: alpha1 {t[0]:.2f} -> {t[1]:.2f} ({t[1] / t[0]:.3f})  "
                  f"alpha0 {t[2]:.2f} -> {t[3]:.2f} ({t[3] / t[2]:.3f})", flush=True)
        del cps
        torch.cuda.empty_cache()
write_probe_results(sys.argv[1], rows, __doc__)
