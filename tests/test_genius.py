"""The genius experiment: answer extraction, scoring, prompts, and a CPU smoke run on a tiny Llama."""
import json

import pytest
import torch
from conftest import DATA, char_tokenizer, tiny_model

from libortho.eval import genius
from libortho.eval.fewshot import (
    TASKS,
    answer_text,
    build_prompt,
    evaluate_task,
    extract_answer,
    load_task,
    newline_token_mask,
    score,
    wilson_interval,
)

REASONING = DATA / "reasoning"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("text, expected", [
    ("7", 7),
    (" 42", 42),
    ("   9\n", 9),
    ("-12 apples", -12),
    ("The answer is -3.", -3),
    ("The answer is 7. Next question", 7),
    ("13\nQuestion: What is 2 + 2?\nAnswer: 4", 13),
    ("12 + 3 = 15", 12),
    ("5-3", 5),             # the first integer; its minus belongs to the second number
    ("x-3", -3),            # a minus directly before the digits counts
    ("- 3", 3),             # ... and only then
    ("--4", -4),
    ("+8", 8),
    ("12,345 people", 12345),  # thousands separators in exact groups of three
    ("1,2,3", 1),              # not thousands groups: a list
    ("1234,567", 1234),
    ("7.0", 7),
    ("7.5", None),          # the first number is not an integer: no integer answer
    ("007", 7),
    ("no number", None),
    ("", None),
    (None, None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_answer_text_cuts_at_first_newline():
    assert answer_text(" 9\n\nQuestion: What is 1 + 1?\nAnswer: 2") == " 9"
    assert extract_answer(answer_text("\n7")) is None  # an empty first line is no answer
    assert answer_text("no newline 5") == "no newline 5"


def test_score_counts_and_interval():
    s = score([7, None, -3, " 4\n5", "4"], ["7", "1", "-3", "4", 5])
    assert (s["correct"], s["n"]) == (3, 5)
    assert s["accuracy"] == pytest.approx(0.6)
    assert s["ci_low"] < 0.6 < s["ci_high"]
    assert score([], [])["n"] == 0
    with pytest.raises(ValueError):
        score([1], [1, 2])


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and 0.1 < hi < 0.2  # not degenerate at p = 0
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and 0.8 < lo < 0.9
    assert wilson_interval(0, 0) == (0.0, 1.0)
    narrow, wide = wilson_interval(375, 500), wilson_interval(30, 40)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


@pytest.mark.parametrize("task", TASKS)
def test_build_prompt_from_real_files(task):
    fewshot, test = load_task(task, REASONING)
    assert len(fewshot) == 50 and len(test) == 500
    q = test[0]["question"]
    prompt = build_prompt(fewshot, q, k=5)
    assert prompt.endswith(f"Question: {q}\nAnswer:")
    assert prompt.count("Question:") == 6 and prompt.count("Answer:") == 6
    assert prompt.startswith(f"Question: {fewshot[0]['question']}\nAnswer: {fewshot[0]['answer']}\n\n") \
        or fewshot[0]["question"] == q
    # a shot equal to the test question is skipped, so its answer never sits in the prompt
    own = build_prompt(fewshot, fewshot[1]["question"], k=5)
    assert own.count(f"Question: {fewshot[1]['question']}\n") == 1
    assert f"Question: {fewshot[5]['question']}\n" in own
    assert load_task(task, DATA)[0] == fewshot  # the data folder or its reasoning/ both work


def test_conditions_registry():
    names = [c.name for c in genius.default_conditions()]
    for n in ("bf16", "int4-base", "gptq-int4", "int3-base", "gptq-int3", "int3-ortho-0.5%", "int3-ortho-1%",
              "int3-ortho-2%", "int3-ortho-5%", "int3-ortho-1%-taskcalib", "random-1%", "int2-base",
              "int2-ortho-2%"):
        assert n in names
    assert len(set(names)) == len(names)
    by = {c.name: c for c in genius.default_conditions(seed=3)}
    assert by["int3-base"].config.method == "rtn" and not by["int3-base"].config.has_ortho
    assert by["gptq-int3"].config.method == "gptq" and not by["gptq-int3"].config.has_ortho
    o = by["int3-ortho-1%"].config
    assert (o.bits, o.group_size, o.density, o.score, o.method, o.seed) == (3, 128, 0.01, "hessian", "gptq", 3)
    assert by["random-1%"].config.score == "random" and by["random-1%"].config.density == 0.01
    assert by["int3-ortho-1%-taskcalib"].calib == "tasks" and by["int3-ortho-1%"].calib == "public"
    assert (by["int2-ortho-2%"].config.bits, by["int2-ortho-2%"].config.group_size) == (2, 64)
    assert [c.name for c in genius.select_conditions(["gptq-int3"])] == ["bf16", "gptq-int3"]
    with pytest.raises(SystemExit):
        genius.select_conditions(["int9-magic"])


def test_cli_help_and_list(capsys):
    from libortho.cli import build_parser, main
    with pytest.raises(SystemExit):  # names with '%' must not break argparse's %-formatted help
        build_parser().parse_args(["experiment", "genius", "--help"])
    assert "int3-ortho-1%" in capsys.readouterr().out
    main(["experiment", "genius", "--list"])
    assert "random-1%" in capsys.readouterr().out


# -- a tiny model and a char-level tokenizer (tests/conftest.py) ---------------------------------------


def test_newline_mask_and_task_calibration_text():
    tok = char_tokenizer()
    mask = newline_token_mask(tok)
    assert mask.sum() == 1 and mask[tok.convert_tokens_to_ids("\n")]
    text = genius.task_calibration_text(tok, ["add1", "sub2"], REASONING, n_tokens=5000, seed=0)
    assert len(tok(text)["input_ids"]) >= 5000
    assert "Question: What is 7 + 2?\nAnswer: 9\n\n" in text and "minus" in text
    assert "Answer:" in text and text == genius.task_calibration_text(tok, ["add1", "sub2"], REASONING, 5000, 0)


def test_evaluate_task_generation_cut_and_dedup():
    tok = char_tokenizer()
    model = tiny_model("llama")
    r = evaluate_task(model, tok, "add1", REASONING, n_test=8, batch_size=3, max_new_tokens=4, k=2,
                      progress=False, return_outputs=True)
    assert r["n"] == 8 and 0 <= r["correct"] <= 8 and r["n_distinct"] <= 8
    for o in r["outputs"]:
        assert "\n" not in o["text"] and len(o["text"]) <= 4  # cut at newline, at most 4 tokens
    same_q = {}
    for o in r["outputs"]:  # repeated questions share one generation
        assert same_q.setdefault(o["question"], o["text"]) == o["text"]


def test_cast_params_keeps_ortho_buffers():
    import libortho
    model = tiny_model("llama")
    libortho.decompose(model, libortho.OrthoConfig(bits=4, density=0.05), progress=False)
    genius.cast_params(model, torch.bfloat16)
    layer = libortho.ortho_layers(model)[0][1]
    assert layer.scales.dtype == torch.float16 and layer.values.dtype == torch.float16
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if "inv_freq" in n)


SMOKE_ARGS = ["--device", "cpu", "--data-dir", str(DATA), "--tasks", "add1", "sub2", "--n-test", "6", "--shots", "2",
              "--max-new-tokens", "4", "--calib-samples", "4", "--calib-seq-len", "32", "--ppl-tokens", "256",
              "--ppl-seq-len", "64", "--no-progress"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One serial CLI run on a tiny random Llama with a char-level tokenizer (saved as a HF folder)."""
    from libortho.cli import main
    tmp = tmp_path_factory.mktemp("genius")
    model_dir = tmp / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    out = tmp / "out"
    main(["experiment", "genius", "--model", str(model_dir), *SMOKE_ARGS, "--conditions", "int3-base",
          "int3-ortho-1%", "--out-dir", str(out), "--name", "g"])
    return model_dir, out


def test_smoke_cli_on_tiny_llama(smoke):
    _, out = smoke
    res = json.loads((out / "g.json").read_text())
    for key in ("command", "date", "device", "versions", "model", "seeds", "protocol", "settings",
                "calibration", "conditions", "summary"):
        assert key in res
    assert res["command"].startswith("libortho experiment genius ")
    assert {"torch", "transformers"} <= set(res["versions"]) and res["device"]["type"] == "cpu"
    names = [r["name"] for r in res["conditions"]]
    assert names == ["bf16", "int3-base", "int3-ortho-1%", "int3-ortho-1%@alpha0"]
    by = {r["name"]: r for r in res["conditions"]}
    for r in res["conditions"]:
        assert set(r["tasks"]) == {"add1", "sub2"}
        for t in r["tasks"].values():
            assert {"accuracy", "ci_low", "ci_high", "n", "correct"} <= set(t) and t["n"] == 6
            assert 0 <= t["ci_low"] <= t["accuracy"] <= t["ci_high"] <= 1
        assert r["bits_per_weight"] > 0 and r["ppl"] > 1 and "--conditions" in r["command"]
        assert r["ppl_retention"] is not None and "mean" in r and "skill_retention" in r
    assert by["bf16"]["ppl_retention"] == 1.0 and by["bf16"]["config"] is None
    assert by["int3-base"]["config"]["method"] == "rtn" and by["int3-base"]["calibration"] is None
    assert by["int3-ortho-1%"]["config"]["density"] == 0.01 and "austen-emma" in by["int3-ortho-1%"]["calibration"]
    assert by["int3-ortho-1%@alpha0"]["bits_per_weight"] < by["int3-ortho-1%"]["bits_per_weight"]
    assert by["int3-base"]["bits_per_weight"] == pytest.approx(by["int3-ortho-1%@alpha0"]["bits_per_weight"])
    md = (out / "g.md").read_text()
    assert "| condition | bits/w |" in md and "int3-ortho-1%@alpha0" in md and "skill ret." in md
    assert (out / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_workers_match_serial(smoke, tmp_path):
    from libortho.cli import main
    model_dir, out = smoke
    main(["experiment", "genius", "--model", str(model_dir), *SMOKE_ARGS, "--conditions", "int3-base",
          "--tasks", "add1", "--n-test", "2", "--out-dir", str(tmp_path), "--workers", "2"])
    serial = {r["name"]: r for r in json.loads((out / "g.json").read_text())["conditions"]}
    par = json.loads((tmp_path / "genius.json").read_text())["conditions"]
    assert [r["name"] for r in par] == ["bf16", "int3-base"]
    for r in par:
        assert r["bits_per_weight"] == serial[r["name"]]["bits_per_weight"]
        assert r["ppl"] == pytest.approx(serial[r["name"]]["ppl"], rel=1e-4)


def _fake_row(name, accs, ppl, bits, config=True):
    tasks = {t: {"accuracy": a / 100, "correct": a, "n": 100,
                 **dict(zip(("ci_low", "ci_high"), wilson_interval(a, 100)))} for t, a in accs.items()}
    cfg = None if not config else {"score": "random" if name.startswith("random") else
                                   ("none" if "ortho" not in name else "hessian")}
    return {"name": name, "tasks": tasks, "ppl": ppl, "bits_per_weight": bits, "config": cfg}


def test_retention_summary_and_table(tmp_path):
    from libortho.eval.genius_report import add_retention, markdown_table, plot, summary
    rows = [_fake_row("bf16", {"add1": 80, "sub2": 5}, 20.0, 16, config=False),
            _fake_row("gptq-int3", {"add1": 40, "sub2": 10}, 40.0, 3.2),
            _fake_row("int3-ortho-1%", {"add1": 70, "sub2": 0}, 30.0, 3.5),
            _fake_row("random-1%", {"add1": 42, "sub2": 5}, 39.0, 3.5)]
    add_retention(rows)
    by = {r["name"]: r for r in rows}
    assert by["bf16"]["skill_retention"] == 1.0 and by["bf16"]["ppl_retention"] == 1.0
    assert by["gptq-int3"]["skill_retention_tasks"] == ["add1"]  # bf16 sub2 at 5 %: left out
    assert by["gptq-int3"]["skill_retention"] == pytest.approx(0.5)
    assert by["gptq-int3"]["skill_retention_pooled"] == pytest.approx(50 / 85)
    assert by["gptq-int3"]["ppl_retention"] == pytest.approx(0.5)
    assert by["int3-ortho-1%"]["mean"]["correct"] == 70 and by["int3-ortho-1%"]["mean"]["n"] == 200
    text = summary(rows)
    assert ("int3-ortho-1% (35.0 %, 3.50 bits) vs gptq-int3 (25.0 %, 3.20 bits): +10.0 points [+1.0, +18.8], "
            "better") in text
    assert "random-1%" in text and "perplexity" in text
    table = markdown_table(rows, ["add1", "sub2"])
    assert table.count("\n") == 5 and "| int3-ortho-1% | 3.500 | 70.0 [" in table
    plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_cut_off_run_resumes(smoke, tmp_path, monkeypatch):
    """A run that dies mid-way keeps finished conditions in NAME.partial.jsonl; --resume runs only the rest."""
    from libortho.cli import main
    model_dir, out = smoke
    args = ["experiment", "genius", "--model", str(model_dir), *SMOKE_ARGS, "--conditions", "int3-base",
            "int3-ortho-1%", "--out-dir", str(tmp_path), "--name", "g"]
    real, ran = genius.run_conditions, []

    def dies_on_ortho(base, tok, conds, *a, **k):
        ran.append(conds[0].name)
        if conds[0].name == "int3-ortho-1%":
            raise RuntimeError("cut off")
        return real(base, tok, conds, *a, **k)

    monkeypatch.setattr(genius, "run_conditions", dies_on_ortho)
    with pytest.raises(RuntimeError, match="cut off"):
        main(args)
    partial = tmp_path / "g.partial.jsonl"
    assert [json.loads(x)["condition"] for x in partial.read_text().splitlines()] == ["bf16", "int3-base"]
    assert not (tmp_path / "g.json").exists()
    monkeypatch.setattr(genius, "run_conditions", real)
    ran.clear()
    with pytest.raises(SystemExit, match="other settings"):
        main([*args[:-4], "--seed", "1", *args[-4:], "--resume"])
    main([*args, "--resume"])
    assert not partial.exists()
    got = json.loads((tmp_path / "g.json").read_text())["conditions"]
    want = json.loads((out / "g.json").read_text())["conditions"]
    assert [r["name"] for r in got] == [r["name"] for r in want]
    for a, b in zip(got, want):
        assert a["tasks"] == b["tasks"] and a["ppl"] == pytest.approx(b["ppl"], rel=1e-5)
        assert a["skill_retention"] == b["skill_retention"]
