"""Raise, do not crash: a bad call of the CUDA binding must come back as a Python RuntimeError."""
import torch
from libortho.ops import cuda
ext = cuda.extension()
q = torch.zeros(4, 2, 128, dtype=torch.int32, device="cuda")
s = torch.ones(4, 1, 16, dtype=torch.bfloat16, device="cuda")
rp = torch.zeros(65, dtype=torch.int32, device="cuda")
ci = torch.zeros(0, dtype=torch.int16, device="cuda")
v = torch.zeros(0, dtype=torch.bfloat16, device="cuda")
for m in (1, 65):
    try:
        y = cuda._checked(ext.fused_small_m(torch.randn(m, 128, device="cuda", dtype=torch.bfloat16), q, s, None, rp, ci, v, None, 1.0, 4, 128, 64, 128, 0))
        torch.cuda.synchronize(); print("ok", m, y.shape)
    except RuntimeError as e:
        print("raised", m, str(e)[:200])
