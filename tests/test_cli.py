import json

import pytest
from conftest import DATA, char_tokenizer, tiny_model

from libortho.cli import main


@pytest.fixture
def tiny_dir(tmp_path):
    d = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


def test_decompose_info_generate_eval(tiny_dir, tmp_path, capsys):
    out = tmp_path / "dec"
    main(["decompose", str(tiny_dir), "--out", str(out), "--bits", "3", "--group-size", "32", "--density", "0.05"])
    assert (out / "libortho.json").exists() and (out / "tokenizer.json").exists()
    main(["info", str(out)])
    text = capsys.readouterr().out
    assert "bits/weight" in text and '"density": 0.05' in text
    main(["generate", str(out), "--alpha", "1", "0", "--max-new-tokens", "4", "--no-chat", "--prompt", "abc"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[alpha=")]
    assert len(lines) == 2
    res = tmp_path / "ppl.json"
    main(["eval", "ppl", str(out), "--text", str(DATA / "text" / "austen-emma.txt"), "--seq-len", "64",
          "--max-tokens", "640", "--out", str(res)])
    rows = json.loads(res.read_text())["rows"]
    assert [r["alpha"] for r in rows] == [1.0, 0.0] and all(r["ppl"] > 1 for r in rows)


def test_calibrated_decompose_needs_calib(tiny_dir, tmp_path):
    with pytest.raises(SystemExit, match="needs --calib"):
        main(["decompose", str(tiny_dir), "--out", str(tmp_path / "x"), "--method", "gptq"])


def test_bad_options_fail_before_the_model_loads(tmp_path, monkeypatch):
    import libortho

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(libortho, "load_model", no_load)
    for args, message in ((["--density", "1.5"], "density"), (["--bits", "5"], "bits=5"),
                          (["--group-size", "100"], "group"), (["--method", "gptq"], "needs --calib")):
        with pytest.raises(SystemExit, match=message):
            main(["decompose", "smollm2", "--out", str(tmp_path / "x"), *args])
    with pytest.raises(SystemExit, match="density"):
        main(["demo", "--density", "1.5"])
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(SystemExit, match="missing.txt does not exist"):
        main(["decompose", "smollm2", "--out", str(tmp_path / "x"), "--method", "gptq", "--calib", missing])
    with pytest.raises(SystemExit, match="missing.txt does not exist"):
        main(["eval", "ppl", "smollm2", "--text", missing])


def test_bad_input_is_a_message(tiny_dir, tmp_path):
    with pytest.raises(SystemExit, match="density"):
        main(["decompose", str(tiny_dir), "--out", str(tmp_path / "x"), "--density", "1.5"])
    with pytest.raises(SystemExit, match="not a LibOrtho save"):
        main(["info", str(tiny_dir)])


def test_build_kernels_says_why_it_cannot(monkeypatch, capsys):
    from libortho.ops import cuda
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        main(["build-kernels"])
    # a GPU whose build fails: the build's own error, not a fallback in silence
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setitem(cuda._state, "error", None)
    def failing(verbose=False):
        cuda._state["error"] = RuntimeError("nvcc exploded")
        return False
    monkeypatch.setattr(cuda, "build", failing)
    with pytest.raises(SystemExit, match="could not be built: nvcc exploded"):
        main(["build-kernels"])
    monkeypatch.setattr(cuda, "build", lambda verbose=False: True)
    main(["build-kernels"])
    assert capsys.readouterr().out.startswith("build ok (")
