"""benchmarks/plot_bounds.py: the series it draws from the probe JSONs, and the committed results render."""
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the plot scripts import plot_common from beside them
spec = importlib.util.spec_from_file_location("plot_bounds", ROOT / "benchmarks" / "plot_bounds.py")
plot_bounds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_bounds)


def test_floor_series_sorted_by_bytes():
    rows = [{"int4_mb": 8.0, "alpha0_cold_us": 5.6, "alpha0_warm_us": 5.5, "bf16_cold_us": 13.0},
            {"int4_mb": 2.0, "alpha0_cold_us": 4.3, "alpha0_warm_us": 4.2, "bf16_cold_us": 7.7}]
    s = plot_bounds.floor_series({"rows": rows})
    assert s["LibOrtho v1, cold"] == ([2.0, 8.0], [4.3, 5.6])
    assert s["LibOrtho v1, warm (in L2)"][1] == [4.2, 5.5] and s["bf16 F.linear, cold"][1] == [7.7, 13.0]


def test_step_parts_take_default_backend_rows_and_add_the_gaps():
    ok = {"alpha": 0.0, "launch_gap_ms": 0.15, "categories_us": {"libortho op": 1660.0, "attention": 310.0}}
    other = dict(ok, alpha=1.0, sdpa="math")
    failed = {"alpha": 0.0, "sdpa": "flash", "error": "no kernel"}
    parts = plot_bounds.step_parts({"rows": [ok, other, failed]})
    assert [label for label, _ in parts] == ["alpha = 0"]
    p = parts[0][1]
    assert p["libortho op"] == 1.66 and p["attention"] == 0.31 and p["gaps"] == 0.15
    assert p["cuBLAS (lm_head)"] == 0.0  # a kind not profiled counts as nothing, not as missing


def test_committed_results_render(tmp_path):
    res = ROOT / "benchmarks" / "results"
    floor = json.loads((res / "floor-H200.json").read_text())
    profile = json.loads((res / "decode-profile-H200.json").read_text())
    s = plot_bounds.floor_series(floor)
    cold, warm = s["LibOrtho v1, cold"][1], s["LibOrtho v1, warm (in L2)"][1]
    assert all(w <= c * 1.05 for w, c in zip(warm, cold))  # what the plot claims: warm is no faster than cold
    out = tmp_path / "b.png"
    plot_bounds.plot(floor, profile, out)
    assert out.stat().st_size > 10_000
