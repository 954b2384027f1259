"""Control for test_cuda_repeated_fast_generates_do_not_grow_memory (GPU): the same test with the fix bypassed (a new
warm-up stream per decoder, as before 6e85abe) must fail; argv[1] == 'fix' runs it as landed.

    LIBORTHO_BACKEND=reference PYTHONPATH=$PWD/src python benchmarks/probes/warmup_stream_control.py nofix   # then: fix
"""
import sys
import torch
sys.path[:0] = ["tests"]
import test_bench_decode as t
from libortho.eval import bench_decode as bd
if sys.argv[1] != "fix":
    bd._warmup_stream = lambda device: torch.cuda.Stream(device)
try:
    t.test_cuda_repeated_fast_generates_do_not_grow_memory()
    print(sys.argv[1], "PASSED")
except AssertionError as e:
    print(sys.argv[1], "FAILED:", e)
