"""The case profiled by benchmarks/ncu_profile.sh: one INT4 g128 layer at M = 1 (N K from argv, default
4096 4096), LibOrtho alpha 0 then 1 (decode kernel from $LIBORTHO_DECODE_KERNEL), then torch's int4 kernel
and bf16 F.linear on the same weight, each called 3 times (ncu skips the first of each by name)."""
import sys

import torch
import torch.nn.functional as F

from libortho.eval.bench_kernels import _layer_call, _ortho_layer, _torch_int4
from libortho.ops import cuda

cuda.build()
d = float(sys.argv[1]) if len(sys.argv) > 1 else 0.01
n, k = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (4096, 4096)
w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
lay = _ortho_layer(w, 4, 128, d)
x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
calls = [_layer_call(lay, x, a) for a in (0.0, 1.0)]
int4 = _torch_int4(w, 128, x)
if int4 is not None:
    calls.append(int4[2])
calls.append(lambda: F.linear(x, w))
for f in calls:
    for _ in range(3):
        f()
torch.cuda.synchronize()
