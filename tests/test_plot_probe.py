"""The 'where the decode time goes' plot: the stream bar of a shape is the fastest read-only configuration over
the same bytes, and the committed H200 results render."""
import importlib.util
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the plot scripts import plot_common from beside them
spec = importlib.util.spec_from_file_location("plot_probe", ROOT / "benchmarks" / "plot_probe.py")
plot_probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_probe)


def test_stream_bar_is_the_fastest_config_over_the_same_bytes():
    probe = {"rows": [{"N": 64, "K": 32, "us": {"floor": 1.0, "bf16": 5.0, "libortho_v1": 4.0}},
                      {"N": 32, "K": 64, "us": {"floor": 1.1, "bf16": 5.5}}]}
    stream = {"rows": [{"bytes": 1024, "us": 3.0}, {"bytes": 1024, "us": 2.5}, {"bytes": 999, "us": 0.1}]}
    shapes, us = plot_probe.series(probe, stream)
    assert shapes == ["64x32", "32x64"]
    assert us["stream"] == [2.5, 2.5]                 # both shapes hold 1024 bytes at INT4
    assert us["libortho_v1"][0] == 4.0 and math.isnan(us["libortho_v1"][1])  # missing: a gap, not a zero


def test_committed_results_render(tmp_path):
    import json
    res = ROOT / "benchmarks" / "results"
    probe = json.loads((res / "probe-H200.json").read_text())
    shapes, us = plot_probe.series(probe, json.loads((res / "stream-H200.json").read_text()))
    assert all(s < v for s, v in zip(us["stream"], us["libortho_v1"]))
    out = tmp_path / "p.png"
    plot_probe.plot(shapes, us, "test", out)
    assert out.stat().st_size > 10_000
