"""benchmarks/goals.py: each goal is met only when every row it covers meets it."""
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("goals", Path(__file__).resolve().parents[1] / "benchmarks" / "goals.py")
goals = importlib.util.module_from_spec(spec)
spec.loader.exec_module(goals)


def kernel_row(n, k, m, density, bf16, a0, a1, base=None):
    return {"N": n, "K": k, "M": m, "density": density, "bf16_us": bf16, "alpha0_us": a0, "alpha1_us": a1,
            "base_only_us": base if base is not None else a0}


def by_goal(entries):
    return {e["goal"].split(":")[0]: e for e in entries}


def test_a_goal_is_met_only_by_every_row_it_covers():
    rows = [kernel_row(4096, 4096, 1, 0.01, 30.0, 9.0, 10.0), kernel_row(11008, 4096, 1, 0.01, 60.0, 19.0, 25.0),
            kernel_row(4096, 11008, 1, 0.01, 60.0, 20.0, 22.0),
            kernel_row(1024, 4096, 1, 0.01, 10.0, 9.0, 9.5)]  # not a 7B shape: not covered by the M = 1 goals
    e = by_goal(goals.check(rows, goals.KERNEL_GOALS))
    m1 = e["M = 1, alpha = 0"]
    assert m1["rows"] == 3 and m1["met"] and m1["min"] == 3.0 and m1["max"] == 30 / 9
    a1 = e["M = 1, alpha = 1 at 1 %"]
    assert a1["rows"] == 3 and not a1["met"] and a1["min"] == 2.4  # 60 / 25 misses 2.7
    assert e["M = 16, alpha = 0"]["rows"] == 0 and not e["M = 16, alpha = 0"]["met"]  # nothing measured: not met


def test_null_test_and_large_m_limits():
    rows = [kernel_row(4096, 4096, 8, 0.0, 20.0, 10.1, 10.1, base=10.0),   # alpha 0 1 % slower than base-only: ok
            kernel_row(4096, 4096, 512, 0.01, 100.0, 150.0, 151.0)]        # 1.5x the bf16 time: ok; 1.51x: not
    e = by_goal(goals.check(rows, goals.KERNEL_GOALS))
    assert e["null test"]["met"] and e["null test"]["rows"] == 1
    assert e["M >= 512, alpha = 0"]["met"]
    assert not e["M >= 512, alpha = 1"]["met"]
    rows[0]["alpha0_us"] = 10.3  # 3 % slower than base-only
    assert not by_goal(goals.check(rows, goals.KERNEL_GOALS))["null test"]["met"]


def test_decode_goals_read_the_7b_batch_1_rows():
    row = {"model": "llama2-7b-shape", "batch": 1, "bf16_tok_s": 100.0, "alpha0_tok_s": 290.0, "alpha1_tok_s": 240.0,
           "bf16_weight_bytes": 12.0, "alpha1_weight_bytes": 3.5}
    other = dict(row, batch=8, alpha1_tok_s=10.0)
    e = by_goal(goals.check_decode([row, other, dict(row, model="smollm2", alpha0_tok_s=1.0)]))
    assert e["batch 1, alpha = 0"]["met"] and e["batch 1, alpha = 0"]["rows"] == 1
    assert not e["batch 1, alpha = 1 (1 %)"]["met"]  # 2.4x
    assert e["weights >= 3x smaller than bf16's"]["met"]
    lines = goals.table(goals.check_decode([row]))
    assert lines[2].endswith("| 2.90x | yes |") and "**no** (needs 2.50x)" in lines[3]
