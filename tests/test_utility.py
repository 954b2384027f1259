"""The utility experiment on a tiny random Llama: rows, bits per weight, and --resume of a cut-off run."""
import argparse
import json

import pytest
from conftest import DATA, char_tokenizer, tiny_model

from libortho.eval import utility

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(model_dir, out, **kw):
    p = argparse.ArgumentParser()
    utility.add_arguments(p)
    a = p.parse_args(["--model", str(model_dir), "--device", "cpu", "--out-dir", str(out), "--bits", "4", "3",
                      "--densities", "0.05", "--group-size", "32", "--calib-samples", "4", "--calib-seq-len", "32",
                      "--seq-len", "64", "--max-eval-tokens", "512",
                      "--calib", str(DATA / "text" / "austen-emma.txt"),
                      "--eval-text", str(DATA / "text" / "austen-prideprejudice.txt")])
    for k, v in kw.items():
        setattr(a, k, v)
    return a


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


def test_utility_rows_and_resume(model_dir, tmp_path):
    full = tmp_path / "full"
    utility.run(_args(model_dir, full))
    want = json.loads((full / "utility.json").read_text())
    names = [r["name"] for r in want["rows"]]
    assert names[0] == "fp32" and names.index("int4-gptq") < names.index("int3-rtn")
    assert len(names) == 1 + 2 * 5 and (full / "utility.md").is_file() and (full / "utility.png").is_file()
    by = {r["name"]: r for r in want["rows"]}
    assert by["int4-libortho-gptq-5%"]["bits_per_weight"] > by["int4-gptq"]["bits_per_weight"]
    assert "ppl_alpha0" in by["int3-random-1%"] and "ppl_alpha0" not in by["int3-gptq"]

    cut = tmp_path / "cut"  # a run of the INT4 rows only, then a resume that adds INT3
    utility.run(_args(model_dir, cut, bits=[4]))
    with pytest.raises(SystemExit, match="other settings"):
        utility.run(_args(model_dir, cut, bits=[3], seq_len=32, resume=True))
    utility.run(_args(model_dir, cut, bits=[3], resume=True))
    got = json.loads((cut / "utility.json").read_text())
    assert [r["name"] for r in got["rows"]] == names
    for r in got["rows"]:
        assert r["ppl"] == pytest.approx(by[r["name"]]["ppl"], rel=1e-5)
    assert "(run 2" in got["command"]
    with pytest.raises(SystemExit, match="no .* to resume"):
        utility.run(_args(model_dir, tmp_path / "none", resume=True))
