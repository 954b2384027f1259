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


def _scaled(run, f0, f1=None, date="x"):
    """A copy of a run with alpha 0 times times f0 and alpha 1 times times f1 (default f0)."""
    f1 = f0 if f1 is None else f1
    return {"date": date, "rows": [dict(r, alpha0_us=r["alpha0_us"] * f0, alpha1_us=r["alpha1_us"] * f1)
                                   for r in run["rows"]]}


def test_rounds_give_each_rounds_ratio_and_each_sides_own_spread():
    a_runs = [A, _scaled(A, 1.02)]                       # A's second round 2 % slower: its own spread
    b_runs = [_scaled(A, 0.9, 1.0), _scaled(A, 0.9 * 1.02 * 1.01, 1.02)]
    rows = ck.round_rows(a_runs, b_runs)
    assert len(rows) == 4                                # every row is in every run
    r = rows[0]
    assert r["alpha0_us"] == [pytest.approx(0.9), pytest.approx(0.9 * 1.01)]
    assert r["alpha1_us"] == [pytest.approx(1.0), pytest.approx(1.0)]
    assert r["alpha0_us_spread"] == (pytest.approx(1.02), pytest.approx(1.02 * 1.01))
    # a row missing from one run is left out
    assert len(ck.round_rows([A, B], [A, A])) == 3
    with pytest.raises(ValueError, match="pair A_i with B_i: got 2 A runs and 1 B runs"):
        ck.round_rows([A, A], [A])


def test_command_line_with_rounds(tmp_path):
    paths = []
    for name, run in (("a1", A), ("a2", _scaled(A, 1.02)), ("b1", _scaled(A, 0.9, 1.0)), ("b2", _scaled(A, 0.92, 1.0))):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(run))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_kernels.py"), f"{paths[0]},{paths[1]}",
                          f"{paths[2]},{paths[3]}"], capture_output=True, text=True, check=True).stdout
    assert "2 rounds" in out and "4 rows in every run" in out
    # M = 1: rounds 0.9 and 0.92 / 1.02 on every row, so the median of the means is their mean
    assert f"median of mean B / A of alpha0_us per M: M=1 {(0.9 + 0.92 / 1.02) / 2:.3f}, M=16" in out
    assert "own spread of alpha0_us over the rounds (max / min per row, median over rows): A 1.0200, B 1.0222" in out
