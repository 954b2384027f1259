"""Registers, stack and spills of every kernel of a CUDA source in two trees (CPU only: nvcc, no GPU): what a kernel
change costs the kernels it does not mean to change, before any GPU time is spent.

    python benchmarks/ptxas_compare.py v1_configs.cu v1.cu --base main   # the working tree against git rev `main`

Each kernel's name is compared with its anonymous-namespace hash removed (it differs by path); a row per kernel whose
registers, stack frame, spill stores / loads or static shared memory differ.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = "src/libortho/ops/csrc"
FLAGS = ["-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "--resource-usage",
         "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
         "-D__CUDA_NO_HALF2_OPERATORS__"]  # as torch's cpp_extension builds them


def parse(text: str) -> dict[str, tuple[int, int, int, int, int]]:
    """{kernel: (registers, stack bytes, spill stores, spill loads, static shared bytes)} from ptxas's report."""
    out, name, frame = {}, None, (0, 0, 0)
    for line in text.splitlines():
        if m := re.search(r"Function properties for (\S+)", line):
            name = short_name(re.sub(r"_GLOBAL__N__\w+?_cu_[0-9a-f]{8}", "_anon_", m.group(1)))
        elif (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)) and name:
            frame = tuple(map(int, m.groups()))
        elif (m := re.search(r"Used (\d+) registers", line)) and name:
            smem = re.search(r"(\d+) bytes smem", line)
            out[name] = (int(m.group(1)), *frame, int(smem.group(1)) if smem else 0)
            name, frame = None, (0, 0, 0)
    return out


def compile_report(tree: Path, source: str, flags: tuple[str, ...] = ()) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(["nvcc", *FLAGS, *flags, "-c", str(tree / CSRC / source), "-o", os.path.join(tmp, "k.o")],
                           capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"nvcc failed on {tree / CSRC / source}:\n{r.stderr[-3000:]}")
    return parse(r.stdout + r.stderr)


def spills_grew(base: dict, head: dict) -> list[str]:
    """The kernels whose stack, spill stores or spill loads grew (or that are new with any)."""
    return sorted(name for name, b in head.items() if any(x > y for x, y in zip(b[1:4], base.get(name, (0,) * 5)[1:4])))


def short_name(name: str) -> str:
    """A v1 kernel's template arguments in brief (type, bits, NT, configuration, kCut, kNorm), else the name: the key
    of a kernel in both trees whatever its parameter type or template arguments' spelling."""
    m = re.search(r"fused_small_m_kernelI(\w+?)Li(\d+)ELi(\d+)ENS\d+_5V1CfgI(.*?)EEELb(\d)E(?:Lb(\d)E)?", name)
    if not m:
        return name
    dtype, bits, nt, cfg, cut, norm = m.groups()
    norm = norm or "0"  # revisions before the norm forms: no such argument
    args = ",".join(re.findall(r"L[ib](\d+)E", cfg + "E"))
    return f"{dtype.lstrip('0123456789')} int{bits} NT{nt} cfg<{args}> cut{cut} norm{norm}"


def differences(base: dict, head: dict) -> list[str]:
    rows = []
    for name in sorted(set(base) | set(head)):
        a, b = base.get(name), head.get(name)
        if a != b:
            rows.append(f"  {name[:90]:90s} base {a} -> {b}")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sources", nargs="+", help="files under src/libortho/ops/csrc")
    ap.add_argument("--base", default="main", help="git revision to compare the working tree with")
    ap.add_argument("--flags", nargs="*", default=[], help="more nvcc flags for the working tree only (a draft's -D switch)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", a.base, CSRC], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        jobs = [(tree, s, flags) for s in a.sources for tree, flags in ((Path(tmp), ()), (ROOT, tuple(a.flags)))]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            reports = list(pool.map(lambda job: compile_report(*job), jobs))
    print("(registers, stack, spill stores, spill loads, static smem) per kernel that differs")
    for i, source in enumerate(a.sources):
        base, head = reports[2 * i], reports[2 * i + 1]
        rows = differences(base, head)
        print(f"{source}: {len(head)} kernels, {len(rows)} differ from {a.base}, "
              f"spills grew in {len(spills_grew(base, head))}")
        print("\n".join(rows) if rows else "  (none)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
