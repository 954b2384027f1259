"""The probes' shared JSON writer (libortho.eval.bench_kernels.write_probe_results)."""
import datetime as dt
import json

import torch

from libortho.eval.bench_kernels import write_probe_results


def test_probe_results_hold_card_versions_date_fields_method_and_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA Test-Card")
    rows = [{"N": 16, "K": 64, "us": 1.5}]
    out = write_probe_results(tmp_path / "sub" / "probe.json", rows, "  What it measures.\n", density=0.01)
    d = json.loads(out.read_text())
    assert list(d) == ["card", "torch", "date", "density", "method", "rows"]
    assert d["card"] == "NVIDIA Test-Card" and d["torch"] == torch.__version__
    assert abs((dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(d["date"])).total_seconds()) < 60
    assert d["density"] == 0.01 and d["method"] == "What it measures." and d["rows"] == rows
