"""benchmarks/plot_decode.py: the bars it draws from decode JSONs, and the committed results render."""
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the plot scripts import plot_common from beside them
spec = importlib.util.spec_from_file_location("plot_decode", ROOT / "benchmarks" / "plot_decode.py")
plot_decode = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_decode)


def test_bars_per_batch_one_model_later_files_override():
    a = {"rows": [{"model": "llama2-7b-shape", "batch": 8, "bf16_tok_s": 1400.0, "alpha0_tok_s": 3000.0,
                   "alpha1_tok_s": None},
                  {"model": "smollm2", "batch": 1, "bf16_tok_s": 300.0, "alpha0_tok_s": 320.0}]}
    b = {"rows": [{"model": "llama2-7b-shape", "batch": 1, "bf16_tok_s": 200.0, "alpha0_tok_s": 450.0,
                   "alpha1_tok_s": 370.0},
                  {"model": "llama2-7b-shape", "batch": 8, "bf16_tok_s": 1450.0, "alpha1_tok_s": 2100.0}]}
    got = plot_decode.bars([a, b])
    assert list(got) == [1, 8]
    assert got[1] == {"bf16": 200.0, "alpha1": 370.0, "alpha0": 450.0}
    assert got[8] == {"bf16": 1450.0, "alpha0": 3000.0, "alpha1": 2100.0}  # a missing value is not a bar


def test_committed_results_render(tmp_path):
    res = ROOT / "benchmarks" / "results"
    results = [json.loads((res / s.format(card="H200")).read_text()) for s in plot_decode.SOURCES]
    got = plot_decode.bars(results)
    assert set(got) == {1, 8} and all(set(v) == {"bf16", "alpha1", "alpha0"} for v in got.values())
    out = tmp_path / "d.png"
    plot_decode.plot(results, out)
    assert out.stat().st_size > 10_000
