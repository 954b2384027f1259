"""benchmarks/plot_kernels.py: the speed-up series it draws from a kernel table, and the committed table renders."""
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the plot scripts import plot_common from beside them
spec = importlib.util.spec_from_file_location("plot_kernels", ROOT / "benchmarks" / "plot_kernels.py")
plot_kernels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_kernels)


def row(n, m, d, bf16, a0, a1, int4=None):
    return {"N": n, "K": 4096, "M": m, "density": d, "bf16_us": bf16, "alpha0_us": a0, "alpha1_us": a1,
            "torch_int4_us": int4}


def test_speedup_series_per_shape_sorted_by_m_and_one_density():
    rows = [row(4096, 16, 0.0, 13.0, 6.5, 6.5), row(4096, 1, 0.0, 12.0, 4.0, 4.0, 6.0),
            row(4096, 1, 0.01, 12.0, 4.1, 6.0), row(1024, 1, 0.0, 8.0, 4.0, 4.0)]
    s = plot_kernels.speedup_series({"rows": rows}, "alpha0_us", 0.0)
    assert s == {"4096x4096": ([1, 16], [3.0, 2.0]), "1024x4096": ([1], [2.0])}
    assert plot_kernels.speedup_series({"rows": rows}, "alpha1_us", 0.01) == {"4096x4096": ([1], [2.0])}
    # a column missing in a row (torch int4 not timed) drops that point only
    assert plot_kernels.speedup_series({"rows": rows}, "torch_int4_us", 0.0) == {"4096x4096": ([1], [2.0])}


def test_committed_table_renders(tmp_path):
    result = json.loads((ROOT / "benchmarks" / "results" / "kernels-H200.json").read_text())
    s = plot_kernels.speedup_series(result, "alpha0_us", 0.0)
    assert len(s) == 6 and all(ms == sorted(ms) and 1 in ms and 512 in ms for ms, _ in s.values())
    out = tmp_path / "k.png"
    plot_kernels.plot(result, out)
    assert out.stat().st_size > 10_000
