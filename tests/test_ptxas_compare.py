"""benchmarks/ptxas_compare.py's reading of ptxas's report (CPU only; the nvcc runs are not tested here)."""
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("ptxas_compare",
                                              Path(__file__).resolve().parents[1] / "benchmarks" / "ptxas_compare.py")
pc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pc)

KERNEL = "_ZN8libortho37_GLOBAL__N__{}_5_v1_cu_{}20fused_small_m_kernelI6__halfLi8ELi1ENS0_5V1CfgILi2ELb1EEE"
REPORT = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '{k}' for 'sm_90a'
ptxas info    : Function properties for {k}
    {stack} bytes stack frame, {st} bytes spill stores, {ld} bytes spill loads
ptxas info    : Used {regs} registers, used 1 barriers, {stack} bytes cumulative stack size, {smem} bytes smem
ptxas info    : Function properties for other_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
"""


def test_parse_reads_each_kernel_and_drops_the_path_hash():
    a = pc.parse(REPORT.format(k=KERNEL.format("831023ca", "3629bc41"), stack=8, st=8, ld=4, regs=128, smem=17536))
    b = pc.parse(REPORT.format(k=KERNEL.format("0e6269e5", "27932f2a"), stack=8, st=8, ld=4, regs=128, smem=17536))
    assert a == b  # the same kernel from two paths: one name
    assert sorted(a.values()) == [(40, 0, 0, 0, 0), (128, 8, 8, 4, 17536)]


def test_differences_name_only_the_kernels_that_changed():
    base = pc.parse(REPORT.format(k=KERNEL.format("00000001", "00000002"), stack=8, st=12, ld=8, regs=80, smem=100))
    head = pc.parse(REPORT.format(k=KERNEL.format("00000003", "00000004"), stack=32, st=42, ld=56, regs=80, smem=164))
    rows = pc.differences(base, head)
    assert len(rows) == 1 and "(80, 8, 12, 8, 100) -> (80, 32, 42, 56, 164)" in rows[0] and "Li2ELb1" in rows[0]
    assert pc.differences(base, base) == []
    assert len(pc.spills_grew(base, head)) == 1 and pc.spills_grew(head, base) == []


def test_short_name_spells_out_a_v1_kernels_template_arguments():
    real = ("_ZN8libortho_anon_20fused_small_m_kernelI13__nv_bfloat16Li4ELi2ENS0_5V1CfgILi1ELb1ELi3ELi3ELi4ELi2ELb0ELb1"
            "ELi8ELb0EEELb1ELb0EEEvNS_8OperandsEPKT_S8_PS6_i")
    short = "__nv_bfloat16 int4 NT2 cfg<1,1,3,3,4,2,0,1,8,0> cut1 norm0"
    assert pc.short_name(real) == short
    assert pc.parse(REPORT.format(k=real.replace("_anon_", "_GLOBAL__N__8cb56bc3_11_v1_norms_cu_b1be8565"), stack=0,
                                  st=0, ld=0, regs=80, smem=0)).keys() >= {short}  # the hash's 8 digits, not the 20f
    before = real.replace("ELb1ELb0EEEv", "ELb1EEEv")  # a revision without the kNorm argument: the same key
    assert pc.short_name(before) == short
    assert pc.short_name("other_kernel") == "other_kernel"


def test_flags_reach_the_working_trees_nvcc_only(monkeypatch, tmp_path):
    calls = []

    class Done:
        returncode, stdout, stderr = 0, "", REPORT.format(k="k", stack=0, st=0, ld=0, regs=40, smem=0)

    def run(cmd, **kw):
        if cmd[0] == "nvcc":
            calls.append(cmd)
            return Done()
        return type("R", (), {"stdout": b""})()  # git archive, tar: nothing to extract

    monkeypatch.setattr(pc.subprocess, "run", run)
    pc.main(["v1.cu", "--base", "HEAD", "--flags=-DLIBORTHO_X=1"])
    assert len(calls) == 2
    with_flag = [c for c in calls if "-DLIBORTHO_X=1" in c]
    assert len(with_flag) == 1 and str(pc.ROOT) in with_flag[0][-3]  # the working tree's source, not the base's
