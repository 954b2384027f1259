"""Privacy experiment: canaries, exposure against brute force, AUC, and a CPU smoke run of the pipeline."""
import json
import math

import numpy as np
import pytest
import torch
from conftest import DATA, char_tokenizer, tiny_model

from libortho.eval import canaries as C
from libortho.eval.finetune import build_training_set, split_heldout

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


# -- canaries ---------------------------------------------------------------------------------------

def test_canaries_distinct_seeded_disjoint():
    m, n = C.make_canaries(32, digits=6, seed=3)
    assert len(m) == len(n) == 32
    prefixes = [c.prefix for c in m + n]
    assert len(set(prefixes)) == 64                       # distinct prefixes across members and non-members
    assert not {c.name for c in m} & {c.name for c in n}  # disjoint
    assert all(len(c.secret) == 6 and c.secret.isdigit() for c in m + n)
    assert all(c.text == c.prefix + c.secret and c.prefix.endswith("is ") for c in m)
    assert C.make_canaries(32, 6, seed=3) == (m, n)       # seeded
    assert C.make_canaries(32, 6, seed=4) != (m, n)
    m3, _ = C.make_canaries(4, digits=3, seed=0, template="Locker code for {name}: {secret}")
    assert all(len(c.secret) == 3 and c.prefix.startswith("Locker code for ") for c in m3)
    with pytest.raises(ValueError):
        C.make_canaries(4, template="{secret} belongs to {name}")


def test_encode_canaries_one_token_per_digit(tok):
    m, _ = C.make_canaries(5, digits=3, seed=0)
    enc = C.encode_canaries(tok, m)
    assert enc.secrets.shape == (5, 3)
    for i, c in enumerate(m):
        assert tok.decode(enc.token_ids(i).tolist()) == c.text
        assert enc.secrets[i].tolist() == [int(ch) for ch in c.secret]


# -- exposure ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("digits", [2, 3])
def test_exact_enumeration_matches_brute_force(tok, digits):
    model = tiny_model("llama", seed=1)
    m, _ = C.make_canaries(4, digits=digits, seed=1)
    enc = C.encode_canaries(tok, m)
    ll_all = C.all_candidates_loglik(model, enc, batch_size=7)   # odd batch: chunks cross canaries
    space = 10 ** digits
    assert ll_all.shape == (4, space)
    # brute force: one full forward pass per candidate, full-vocabulary log-softmax
    cands = C.all_digit_strings(digits)
    with torch.no_grad():
        for i in range(4):
            ids = torch.cat([enc.prefixes[i].expand(space, -1), enc.digit_ids[cands]], dim=1)
            lp = model(ids).logits.log_softmax(-1)
            p = enc.prefixes[i].numel()
            brute = sum(lp[:, p - 1 + t].gather(1, ids[:, p + t:p + t + 1]).squeeze(1) for t in range(digits))
            torch.testing.assert_close(ll_all[i], brute, atol=1e-4, rtol=1e-5)
            # exposure of the true secret from a brute-force ranking
            s = int(m[i].secret)
            rank = 1 + int((brute > brute[s]).sum())
            e = C.exact_exposure(model, C.EncodedCanaries([enc.prefixes[i]], enc.secrets[i:i + 1], enc.digit_ids))
            assert e["rank"][0] == pytest.approx(rank, abs=0.5)
            assert e["exposure"][0] == pytest.approx(math.log2(space) - math.log2(e["rank"][0]))
    # teacher-forced secret log-likelihood agrees with the enumeration
    ll_s = C.secret_loglik(model, enc)
    torch.testing.assert_close(ll_s, ll_all.gather(1, C.secret_index(enc.secrets)[:, None]).squeeze(1),
                               atol=1e-4, rtol=1e-5)


def _reference_loglik(model, prefix, digit_ids, cands, chunk=1000):
    """Candidates (k, D) scored by one plain forward pass of prefix + digits each (no cache): (k,)."""
    p, out = prefix.numel(), []
    with torch.no_grad():
        for s in range(0, cands.shape[0], chunk):
            ids = torch.cat([prefix.expand(cands[s:s + chunk].shape[0], -1), digit_ids[cands[s:s + chunk]]], 1)
            lp = model(input_ids=ids, use_cache=False).logits[:, p - 1:-1].float().log_softmax(-1)
            out.append(lp.gather(-1, ids[:, p:, None]).squeeze(-1).sum(-1))
    return torch.cat(out)


@pytest.mark.parametrize("arch,digits", [("llama", 4), ("llama", 2), ("gpt2", 3), ("opt", 3)])
def test_all_candidates_matches_uncached_reference(tok, arch, digits):
    """Prefix cache shared across rows of several prefix lengths, on more than one cache/position scheme."""
    model = tiny_model(arch, seed=3)
    m, _ = C.make_canaries(5, digits=digits, seed=0)
    enc = C.encode_canaries(tok, m)
    assert len({p.numel() for p in enc.prefixes}) == 3            # three length groups, two of two canaries
    ll_all = C.all_candidates_loglik(model, enc, batch_size=13)   # odd: batches cross canaries
    assert ll_all.shape == (5, 10 ** digits)
    # all candidates up to 3 digits; at 4, a random tenth (plain passes of 10**4 candidates are slow on CPU)
    idx = torch.randperm(10 ** digits, generator=torch.Generator().manual_seed(0))[:1000]
    for i in range(len(m)):
        ref = _reference_loglik(model, enc.prefixes[i], enc.digit_ids, C.all_digit_strings(digits)[idx])
        torch.testing.assert_close(ll_all[i, idx], ref, atol=1e-4, rtol=1e-5)


def test_rank_and_exposure_by_hand():
    ll = torch.tensor([[0.0, -1.0, -2.0, -3.0], [-1.0, -1.0, -1.0, -5.0]])
    rank = C.rank_of(ll, torch.tensor([-2.0, -1.0]))
    assert rank.tolist() == [3.0, 2.0]                    # ties at mid-rank: 3 tied -> rank 2
    assert C.exposure_from_rank(torch.tensor([1.0, 4.0]), 4).tolist() == [2.0, 0.0]


def test_sampled_exposure_tracks_exact(tok):
    model = tiny_model("llama", seed=2)
    m, _ = C.make_canaries(3, digits=3, seed=2)
    enc = C.encode_canaries(tok, m)
    exact = C.exact_exposure(model, enc)["exposure"]
    sampled = C.sampled_exposure(model, enc, n_samples=999, seed=0)
    assert np.allclose(sampled["exposure_sampled_plain"], exact, atol=0.5)
    assert all(0 <= e <= math.log2(1000) for e in sampled["exposure"])


class Memorizer(torch.nn.Module):
    """A fake LM whose greedy continuation of a known prefix is a fixed digit string."""

    def __init__(self, table: dict, vocab: int = 256):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.table, self.vocab = table, vocab

    def forward(self, input_ids, use_cache=False, logits_to_keep=0, **kw):
        from types import SimpleNamespace
        b, length = input_ids.shape
        logits = torch.zeros(b, length, self.vocab)
        for r, row in enumerate(input_ids.tolist()):
            for prefix, target in self.table.items():
                t = length - len(prefix)
                if tuple(row[:len(prefix)]) == prefix and t < len(target):
                    logits[r, -1, target[t]] = 10.0
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def test_greedy_extraction(tok):
    m, _ = C.make_canaries(4, digits=3, seed=0)
    enc = C.encode_canaries(tok, m)
    target = [enc.digit_ids[enc.secrets[i]].tolist() for i in range(4)]
    wrong_last = target[1][:2] + [enc.digit_ids[(int(m[1].secret[2]) + 1) % 10].item()]
    table = {tuple(enc.prefixes[0].tolist()): target[0], tuple(enc.prefixes[1].tolist()): wrong_last,
             tuple(enc.prefixes[2].tolist()): target[2]}  # canary 3 unknown: greedy emits token 0
    assert C.greedy_extraction(Memorizer(table), enc, batch_size=3).tolist() == [True, False, True, False]


# -- AUC and bootstrap ------------------------------------------------------------------------------

def test_auc_known_cases():
    assert C.auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert C.auc([0, 1, 2], [3, 4, 5]) == 0.0
    assert C.auc([1, 1], [1, 1]) == 0.5
    assert C.auc([2, 0], [1]) == 0.5
    assert C.auc([1, 3], [1, 2]) == pytest.approx(0.625)   # pairs: (1,1)=.5 (1,2)=0 (3,1)=1 (3,2)=1 -> 2.5/4
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 40), rng.normal(0, 1, 50)
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert C.auc(pos, neg) == pytest.approx(brute)
    assert C.midranks([10, 20, 20, 30]).tolist() == [1, 2.5, 2.5, 4]


def test_bootstrap_ci():
    lo, hi = C.bootstrap_ci([1.0] * 10, n_boot=100)
    assert lo == hi == 1.0
    lo, hi = C.bootstrap_ci(np.arange(100.0), n_boot=500, seed=1)
    assert lo < 49.5 < hi and hi - lo < 25
    assert C.bootstrap_ci(np.arange(100.0), n_boot=500, seed=1) == [lo, hi]
    lo, hi = C.bootstrap_auc_ci([[3, 4, 5]], [[0, 1, 2]], n_boot=50)
    assert lo == hi == 1.0


# -- fine-tuning data -------------------------------------------------------------------------------

def test_split_and_training_set(tok):
    text = "".join(f"line {i}\n" for i in range(100))
    train, held = split_heldout(text, 0.1)
    assert train + held == text and held.startswith("line") and 0.08 < len(held) / len(text) < 0.12
    m, _ = C.make_canaries(3, digits=2, seed=0)
    enc = C.encode_canaries(tok, m)
    ids = torch.arange(4, 90).repeat(20)
    data = build_training_set(ids, [enc.token_ids(i) for i in range(3)], [tok("\n")["input_ids"][0]],
                              seq_len=64, n_windows=10, reps=2, seed=0)
    assert data.windows.shape == (10, 64)
    assert sorted(c for w in data.canary_of for c in w) == [0, 0, 1, 1, 2, 2]
    for w, cs in enumerate(data.canary_of):
        for c in cs:
            n = enc.token_ids(c).numel()
            assert data.windows[w, :n].tolist() == enc.token_ids(c).tolist()


# -- the whole pipeline on CPU ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(d)
    tok.save_pretrained(d)
    return d


TINY_RUN = ["--device", "cpu", "--data-dir", str(DATA), "--canaries", "4", "--digits", "3", "--canary-reps", "2",
            "--ft-steps", "3", "--ft-max-steps", "0", "--ft-batch", "4", "--ft-seq-len", "64", "--ft-windows", "32",
            "--ft-check-every", "2"]


def test_privacy_stops_on_unmemorized_model(tiny_dir, tmp_path):
    from libortho.cli import main
    with pytest.raises(SystemExit, match="has not memorized the canaries"):
        main(["experiment", "privacy", "--model", str(tiny_dir), *TINY_RUN, "--out-dir", str(tmp_path),
              "--no-progress"])
    assert not list(tmp_path.iterdir())  # nothing written


SMOKE_EVAL = ["--min-extraction", "0", "--group-size", "32", "--density", "0.05", "--calib-samples", "4",
              "--calib-seq-len", "64", "--alphas", "0", "0.5", "1", "--exposure-alphas", "0", "1",
              "--score-batch", "16",
              "--ppl-tokens", "256", "--ppl-seq-len", "64", "--ppl-batch", "4", "--bootstrap", "50", "--no-progress"]


@pytest.fixture(scope="module")
def smoke_run(tiny_dir, tmp_path_factory):
    from libortho.cli import main
    out = tmp_path_factory.mktemp("results")
    main(["experiment", "privacy", "--model", str(tiny_dir), *TINY_RUN, *SMOKE_EVAL, "--out-dir", str(out)])
    return out


def test_privacy_pipeline_smoke(smoke_run):
    out = smoke_run
    for name in ("privacy.json", "privacy.md", "privacy-alpha.png", "privacy-frontier.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    res = json.loads((out / "privacy.json").read_text())
    for key in ("command", "seeds", "model", "environment", "protocol", "results", "rows", "verdict", "per_seed",
                "timings", "settings"):
        assert key in res
    assert res["seeds"] == [0]
    assert res["environment"]["torch"] == torch.__version__
    names = ["bf16-finetuned", "bf16-reference", "libortho-hessian-public", "libortho-hessian-public+canary",
             "libortho-delta", "random", "magnitude", "int4-rtn", "int4-gptq", "int4-reference"]
    assert list(res["results"]) == names
    for name in names:
        entry = res["results"][name]
        assert "bits_per_weight" in entry and "calibration" in entry
        keys = ["0", "0.5", "1"] if name in names[2:7] else ["none"]
        assert list(entry["alphas"]) == keys
        for k in keys:
            r = entry["alphas"][k]
            for metric in ("extraction", "exposure_mean", "mia_auc", "ppl_heldout", "retention"):
                assert metric in r
            assert 0 <= r["extraction"] <= 1 and 0 <= r["mia_auc"] <= 1 and r["ppl_heldout"] > 1
            assert (r["exposure_mean"] is None) == (k == "0.5")   # exposure only at the chosen alphas
            if r["exposure_mean"] is not None:
                assert 0 <= r["exposure_mean"] <= math.log2(1000)
    ortho = res["results"]["libortho-hessian-public"]
    assert ortho["bits_per_weight"] == pytest.approx(res["results"]["random"]["bits_per_weight"])
    assert ortho["bits_per_weight"] > res["results"]["int4-gptq"]["bits_per_weight"]
    assert ortho["op_check_max_abs_dll"] < 1e-3           # dense materialization == the op (fp32)
    assert "PRIVATE" in res["results"]["libortho-hessian-public+canary"]["calibration"][0]
    assert "PRIVATE" not in (ortho["calibration"][0] or "")
    assert res["results"]["bf16-finetuned"]["alphas"]["none"]["retention"] == pytest.approx(1.0)
    assert res["results"]["bf16-reference"]["alphas"]["none"]["retention"] == pytest.approx(0.0)
    md = (out / "privacy.md").read_text()
    assert "| libortho-delta | 0 |" in md and "Verdict" in md


def test_privacy_merge_seeds(smoke_run, tiny_dir, tmp_path):
    from libortho.cli import main
    main(["experiment", "privacy", "--model", str(tiny_dir), *TINY_RUN, *SMOKE_EVAL, "--seeds", "1",
          "--out-dir", str(tmp_path), "--name", "privacy-seed1"])
    main(["experiment", "privacy", "--merge", str(smoke_run / "privacy.json"), str(tmp_path / "privacy-seed1.json"),
          "--out-dir", str(tmp_path), "--name", "merged"])
    res = json.loads((tmp_path / "merged.json").read_text())
    assert res["seeds"] == [0, 1] and [p["seed"] for p in res["per_seed"]] == [0, 1]
    r = res["results"]["libortho-delta"]["alphas"]["0"]
    assert r["n_canaries"] == 8 and len(r["per_seed"]["extraction"]) == 2
    assert r["ppl_heldout"] == pytest.approx(np.mean(r["per_seed"]["ppl_heldout"]))
    assert (tmp_path / "merged.md").is_file() and (tmp_path / "merged-frontier.png").is_file()
    with pytest.raises(SystemExit, match="repeat seeds"):
        main(["experiment", "privacy", "--merge", str(smoke_run / "privacy.json"), str(smoke_run / "privacy.json"),
              "--out-dir", str(tmp_path), "--name", "bad"])


def test_privacy_workers_match_serial(smoke_run, tiny_dir, tmp_path):
    """Conditions evaluated by worker processes (after one fine-tune in the parent) give the serial rows."""
    from libortho.cli import main
    main(["experiment", "privacy", "--model", str(tiny_dir), *TINY_RUN, *SMOKE_EVAL, "--conditions",
          "libortho-delta", "int4-rtn", "--workers", "2", "--out-dir", str(tmp_path)])
    par = json.loads((tmp_path / "privacy.json").read_text())
    ser = json.loads((smoke_run / "privacy.json").read_text())
    assert list(par["results"]) == ["bf16-finetuned", "bf16-reference", "libortho-delta", "int4-rtn"]
    assert par["settings"]["workers"] == 2
    for name, row in par["results"].items():
        want = ser["results"][name]
        assert row["bits_per_weight"] == want["bits_per_weight"]
        for k, r in row["alphas"].items():
            w = want["alphas"][k]
            assert r["extraction"] == w["extraction"]
            assert r["ppl_heldout"] == pytest.approx(w["ppl_heldout"], rel=1e-4)
            assert r["mia_auc"] == pytest.approx(w["mia_auc"], abs=1e-6)


def test_privacy_cut_off_seed_resumes(smoke_run, tiny_dir, tmp_path, monkeypatch):
    """Finished conditions survive a crash in NAME.partial.jsonl; --resume reruns the fine-tune, checks that
    its weights hash the same, and evaluates only the missing conditions."""
    from libortho.cli import main
    from libortho.eval import privacy
    args = ["experiment", "privacy", "--model", str(tiny_dir), *TINY_RUN, *SMOKE_EVAL, "--conditions", "int4-rtn",
            "libortho-delta", "--out-dir", str(tmp_path)]
    real, ran, crash = privacy.eval_condition, [], [True]

    def crashes_on_delta(cond, *a, **k):
        ran.append(cond.name)
        if cond.name == "libortho-delta" and crash[0]:
            raise RuntimeError("cut off")
        return real(cond, *a, **k)

    monkeypatch.setattr(privacy, "eval_condition", crashes_on_delta)
    with pytest.raises(RuntimeError, match="cut off"):
        main(args)
    lines = [json.loads(x) for x in (tmp_path / "privacy.partial.jsonl").read_text().splitlines()]
    assert [e["condition"] for e in lines] == ["bf16-finetuned", "bf16-reference"]
    assert ran == ["bf16-finetuned", "bf16-reference", "libortho-delta"]
    ran.clear()
    crash[0] = False
    main([*args, "--resume"])
    assert ran == ["libortho-delta", "int4-rtn"]
    assert not (tmp_path / "privacy.partial.jsonl").exists()
    got = json.loads((tmp_path / "privacy.json").read_text())["results"]
    want = json.loads((smoke_run / "privacy.json").read_text())["results"]
    for name in ("bf16-finetuned", "libortho-delta", "int4-rtn"):
        for k, r in got[name]["alphas"].items():
            assert r["extraction"] == want[name]["alphas"][k]["extraction"]
            assert r["ppl_heldout"] == pytest.approx(want[name]["alphas"][k]["ppl_heldout"], rel=1e-5)


def test_privacy_ft_cache_resumes_without_refinetuning(tiny_dir, tmp_path, monkeypatch):
    """--ft-cache keeps the fine-tuned weights: a resumed run loads them (no second fine-tune), so the partial
    rows match even when a fine-tune would not reproduce bit for bit (simulated: the second one is broken)."""
    from libortho.cli import main
    from libortho.eval import finetune as ft_mod
    from libortho.eval import privacy
    args = ["experiment", "privacy", "--model", str(tiny_dir), *TINY_RUN, *SMOKE_EVAL, "--conditions", "int4-rtn",
            "--out-dir", str(tmp_path / "out"), "--ft-cache", str(tmp_path / "ft")]
    real_eval, real_ft, calls = privacy.eval_condition, ft_mod.finetune, []

    def crashes_on_rtn(cond, *a, **k):
        if cond.name == "int4-rtn":
            raise RuntimeError("cut off")
        return real_eval(cond, *a, **k)

    def counted_finetune(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise AssertionError("fine-tuned again although the weights were cached")
        return real_ft(*a, **k)

    monkeypatch.setattr(ft_mod, "finetune", counted_finetune)
    monkeypatch.setattr(privacy, "eval_condition", crashes_on_rtn)
    with pytest.raises(RuntimeError, match="cut off"):
        main(args)
    cached = sorted(p.name for p in (tmp_path / "ft").iterdir())
    assert len(cached) == 2 and cached[0].endswith(".json") and cached[1].endswith(".safetensors")
    monkeypatch.setattr(privacy, "eval_condition", real_eval)
    main([*args, "--resume"])
    assert len(calls) == 1
    res = json.loads((tmp_path / "out" / "privacy.json").read_text())
    assert res["per_seed"][0]["finetune"]["steps"] > 0
    assert list(res["results"]) == ["bf16-finetuned", "bf16-reference", "int4-rtn"]
    assert res["results"]["bf16-finetuned"]["alphas"]["none"]["retention"] == pytest.approx(1.0)


def test_privacy_merge_tolerates_extra_exposure_alphas(smoke_run, tiny_dir, tmp_path):
    """A seed that also measured exposure at alpha 0.5 pools with seeds that did not: exposure is reported
    where every seed has it, every other setting must still match."""
    from libortho.cli import main
    eval_args = list(SMOKE_EVAL)
    i = eval_args.index("--exposure-alphas")
    eval_args[i + 1:i + 3] = ["0", "0.5", "1"]
    main(["experiment", "privacy", "--model", str(tiny_dir), *TINY_RUN, *eval_args, "--seeds", "1",
          "--conditions", "libortho-delta", "--out-dir", str(tmp_path), "--name", "seed1"])
    main(["experiment", "privacy", "--model", str(tiny_dir), *TINY_RUN, *SMOKE_EVAL, "--seeds", "0",
          "--conditions", "libortho-delta", "--out-dir", str(tmp_path), "--name", "seed0"])
    one = json.loads((tmp_path / "seed1.json").read_text())["results"]["libortho-delta"]["alphas"]
    assert one["0.5"]["exposure_mean"] is not None          # seed 1 alone has it
    main(["experiment", "privacy", "--merge", str(tmp_path / "seed0.json"), str(tmp_path / "seed1.json"),
          "--out-dir", str(tmp_path), "--name", "merged"])
    res = json.loads((tmp_path / "merged.json").read_text())
    assert res["settings"]["exposure_alphas"] == [0.0, 1.0]
    alphas = res["results"]["libortho-delta"]["alphas"]
    assert alphas["0.5"]["exposure_mean"] is None and alphas["1"]["exposure_mean"] is not None
    assert alphas["0"]["n_canaries"] == 8
    main(["experiment", "privacy", "--model", str(tiny_dir), *TINY_RUN, *SMOKE_EVAL, "--density", "0.1",
          "--seeds", "2", "--conditions", "libortho-delta", "--out-dir", str(tmp_path), "--name", "other"])
    with pytest.raises(SystemExit, match="density"):
        main(["experiment", "privacy", "--merge", str(tmp_path / "seed0.json"), str(tmp_path / "other.json"),
              "--out-dir", str(tmp_path), "--name", "bad"])
