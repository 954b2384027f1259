"""The case profiled by benchmarks/ncu_profile.sh: one 4096x4096 INT4 layer, M = 1, alpha 0 then 1."""
import sys, torch
from libortho.ops import cuda
from libortho.eval.bench_kernels import _ortho_layer, _layer_call
cuda.build()
n, k, d = 4096, 4096, float(sys.argv[1]) if len(sys.argv) > 1 else 0.01
w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
lay = _ortho_layer(w, 4, 128, d)
x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
for a in (0.0, 1.0):
    f = _layer_call(lay, x, a)
    for _ in range(3):
        f()
torch.cuda.synchronize()
