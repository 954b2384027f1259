"""benchmarks/compare_kernels.py: pairing of two kernel-bench runs, ratios, medians and goal ranges."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compare_kernels", ROOT / "benchmarks" / "compare_kernels.py")
ck = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ck)


def _row(n, k, m, d, bf16, a0, a1):
    return {"N": n, "K": k, "M": m, "density": d, "bf16_us": bf16, "alpha0_us": a0, "alpha1_us": a1}


A = {"date": "a", "rows": [_row(4096, 4096, 1, 0.0, 12.0, 6.0, 6.0), _row(4096, 4096, 1, 0.01, 12.0, 6.0, 8.0),
                           _row(11008, 4096, 1, 0.0, 24.0, 12.0, 12.0), _row(11008, 4096, 16, 0.0, 24.0, 16.0, 16.0)]}
B = {"date": "b", "rows": [_row(11008, 4096, 1, 0.0, 25.0, 10.0, 10.0), _row(4096, 4096, 1, 0.0, 12.5, 6.25, 6.25),
                           _row(4096, 4096, 1, 0.01, 12.0, 5.0, 6.0)]}  # no M = 16 row


def test_pairs_rows_by_shape_m_and_density_in_run_a_order():
    pairs = ck.paired(A, B)
    assert [(a["N"], a["M"], a["density"]) for a, _ in pairs] == [(4096, 1, 0.0), (4096, 1, 0.01), (11008, 1, 0.0)]
    assert all((a["N"], a["K"], a["M"], a["density"]) == (b["N"], b["K"], b["M"], b["density"]) for a, b in pairs)


def test_ratios_and_speedups_use_each_runs_own_bf16():
    rows = ck.ratio_rows(ck.paired(A, B))
    tall = rows[2]
    assert tall["alpha0_us"] == (12.0, 10.0, pytest.approx(10.0 / 12.0))
    assert tall["alpha0_us_speedup"] == (pytest.approx(2.0), pytest.approx(2.5))


def test_median_per_m_and_goal_ranges():
    rows = ck.ratio_rows(ck.paired(A, B))
    assert ck.median_by_m(rows, "alpha0_us") == {1: pytest.approx(5 / 6)}  # of 6.25/6, 5/6 and 10/12
    (a_lo, a_hi), (b_lo, b_hi) = ck.speedup_range(rows, "alpha0_us", 1, 0.0)
    assert (a_lo, a_hi) == (pytest.approx(2.0), pytest.approx(2.0)) and (b_lo, b_hi) == (pytest.approx(2.0), pytest.approx(2.5))
    assert ck.speedup_range(rows, "alpha0_us", 16, 0.0) is None  # B has no M = 16 row


def test_command_line_prints_rows_and_summary(tmp_path):
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(A))
    pb.write_text(json.dumps(B))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_kernels.py"), str(pa), str(pb)],
                         capture_output=True, text=True, check=True).stdout
    assert "3 rows in both" in out and "11008x4096" in out and "median B / A of alpha0_us per M: M=1" in out
    assert "alpha0 M=1 d=0.0: A 2.00-2.00x, B 2.00-2.50x over bf16" in out
