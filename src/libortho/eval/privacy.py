"""``libortho experiment privacy``: does alpha = 0 remove memorized secrets while keeping general ability?

Per seed: make canaries (members + unseen non-members), fine-tune the model on public text with the
members mixed in, verify greedy extraction at full precision, then decompose copies of the fine-tuned
(or reference) model once per condition and evaluate every alpha: greedy extraction, exposure, a
loss-based membership AUC, held-out perplexity and fine-tune retention. Results go to ``privacy.json``,
``privacy.md``, ``privacy-alpha.png`` and ``privacy-frontier.png``.

Protocol choices (also written into every result by :func:`protocol_text`):
* exposure by exact enumeration of all 10**D candidates (a prefix tree over the digits, see
  :mod:`libortho.eval.canaries`), computed at a subset of alphas (default 0, 0.5, 1) because it costs
  ~2.4e5 token evaluations per canary; extraction, the membership AUC and both perplexities are cheap and
  use the full alpha grid.
* every condition is evaluated as dense linears W = deq(Q) + alpha * S in the eval dtype (bf16 on the
  GPU), which is the function the OrthoLinear op computes; the op itself is checked against that dense
  copy in fp32 on the member canaries (``op_check_max_abs_dll``), or used directly with --eval-path op.
"""
from __future__ import annotations

import copy
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import OrthoConfig

FT_BOOKS = ("austen-sensesensibility.txt", "austen-northangerabbey.txt")
CALIB_BOOK = "austen-emma.txt"
HELDOUT_BOOK = "austen-prideprejudice.txt"
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
EXPOSURE_ALPHAS = (0.0, 0.5, 1.0)
NO_ALPHA = "none"  # the alpha key of conditions without an ortho stream


@dataclass(frozen=True)
class Condition:
    """One row of the experiment. ``config`` None: the dense model, evaluated in the eval dtype."""
    name: str
    source: str                     # "finetuned" or "reference": the weights it starts from
    config: OrthoConfig | None
    calib: str | None               # "public" or "public+canary" (for configs needing calibration)
    description: str

    @property
    def has_alpha(self) -> bool:
        return self.config is not None and self.config.has_ortho


def condition_list(bits: int, group_size: int, density: float, method: str, seed: int) -> list[Condition]:
    def ortho(score, base_from="self"):
        return OrthoConfig(bits=bits, group_size=group_size, density=density, score=score, method=method,
                           base_from=base_from, seed=seed)

    base = dict(bits=bits, group_size=group_size, seed=seed)
    q = f"int{bits}"
    d = f"{100 * density:g} %"
    return [
        Condition("bf16-finetuned", "finetuned", None, None, "the fine-tuned model, dense"),
        Condition("bf16-reference", "reference", None, None, "the model before fine-tuning, dense"),
        Condition("libortho-hessian-public", "finetuned", ortho("hessian"), "public",
                  f"LibOrtho base_from=self, hessian sieve at {d}, calibrated on public text only"),
        Condition("libortho-hessian-public+canary", "finetuned", ortho("hessian"), "public+canary",
                  "as libortho-hessian-public, but the calibration also holds the member canaries (private)"),
        Condition("libortho-delta", "finetuned", ortho("hessian", "reference"), "public",
                  f"LibOrtho delta mode: base = {q} of the reference, hessian sieve of W_ft - deq(Q_ref) at {d}"),
        Condition("random", "finetuned", ortho("random"), "public",
                  f"control: seeded random ortho mask at {d} (same method and calibration)"),
        Condition("magnitude", "finetuned", ortho("magnitude"), "public",
                  f"control: magnitude sieve at {d} (same method and calibration)"),
        Condition(f"{q}-rtn", "finetuned", OrthoConfig.base_only(method="rtn", **base), None,
                  f"plain {q} round-to-nearest of the fine-tuned model, no ortho stream"),
        Condition(f"{q}-gptq", "finetuned", OrthoConfig.base_only(method="gptq", **base), "public",
                  f"plain {q} GPTQ of the fine-tuned model, no ortho stream"),
        Condition(f"{q}-reference", "reference", OrthoConfig.base_only(method="gptq", **base), "public",
                  f"plain {q} GPTQ of the reference model (never saw the canaries)"),
    ]


# -- settings ---------------------------------------------------------------------------------------

def add_arguments(p) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="smollm2", help="smollm2 (default), a HF directory or a .gguf file")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--eval-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="dtype of the evaluated models (auto: bfloat16 on cuda, float32 on cpu)")
    g.add_argument("--data-dir", default=None, help="the shared data folder holding text/; default: "
                   "$LIBORTHO_SHARED/data, ./shared/data or ../shared/data")
    g.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one full run (canaries, fine-tune, calibration, random mask) per seed")
    g = p.add_argument_group("canaries")
    g.add_argument("--canaries", type=int, default=32, help="member canaries (as many unseen non-members)")
    g.add_argument("--digits", type=int, default=6, help="secret digits: |R| = 10**digits")
    g.add_argument("--template", default=None, help="canary template with {name} and a final {secret} "
                   "(default: 'The account PIN of {name} is {secret}')")
    g.add_argument("--canary-reps", type=int, default=16, help="occurrences of each canary in the fine-tuning set")
    g = p.add_argument_group("fine-tune")
    g.add_argument("--ft-steps", type=int, default=150, help="fine-tuning steps (at least)")
    g.add_argument("--ft-max-steps", type=int, default=400,
                   help="go on past --ft-steps until extraction reaches --ft-target, at most this many steps "
                   "(<= --ft-steps: exactly --ft-steps)")
    g.add_argument("--ft-target", type=float, default=1.0, help="extraction rate that ends the extension")
    g.add_argument("--ft-batch", type=int, default=16, help="windows per step")
    g.add_argument("--ft-seq-len", type=int, default=256)
    g.add_argument("--ft-windows", type=int, default=0, help="public windows in the fine-tuning set (0: all)")
    g.add_argument("--ft-lr", type=float, default=1e-4)
    g.add_argument("--ft-check-every", type=int, default=25, help="check extraction every N steps")
    g.add_argument("--heldout-frac", type=float, default=0.1,
                   help="last fraction of each fine-tuning book kept out of fine-tuning (retention text)")
    g.add_argument("--min-extraction", type=float, default=0.95,
                   help="stop unless greedy extraction at full precision reaches this (0 disables: tests only)")
    g = p.add_argument_group("decomposition")
    g.add_argument("--bits", type=int, default=4)
    g.add_argument("--group-size", type=int, default=128)
    g.add_argument("--density", type=float, default=0.01)
    g.add_argument("--method", default="gptq", choices=["gptq", "rtn"], help="method of the ortho conditions")
    g.add_argument("--calib-samples", type=int, default=128)
    g.add_argument("--calib-seq-len", type=int, default=512)
    g.add_argument("--conditions", nargs="+", default=None, metavar="NAME",
                   help="subset of conditions (bf16-finetuned and bf16-reference are always run)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    g.add_argument("--exposure", default="exact", choices=["exact", "sampled", "none"])
    g.add_argument("--exposure-alphas", type=float, nargs="+", default=list(EXPOSURE_ALPHAS),
                   help="alphas at which exposure is computed (the other metrics use every alpha)")
    g.add_argument("--exposure-samples", type=int, default=4096, help="candidates per canary (sampled mode)")
    g.add_argument("--score-batch", type=int, default=None,
                   help="sequences per scoring batch (default 2048 cuda, 64 cpu; ~20 GB peak on SmolLM2)")
    g.add_argument("--ppl-tokens", type=int, default=32768, help="tokens of each perplexity text")
    g.add_argument("--ppl-seq-len", type=int, default=2048)
    g.add_argument("--ppl-batch", type=int, default=None, help="windows per batch (default 8 cuda, 1 cpu)")
    g.add_argument("--eval-path", default="dense", choices=["dense", "op"],
                   help="dense: evaluate W = deq(Q) + alpha*S as dense linears (fast; checked against the "
                   "op); op: run the OrthoLinear op itself")
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", default="experiments/results")
    g.add_argument("--name", default="privacy", help="output file stem")
    g.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="no run: pool the seeds of earlier results (same settings, e.g. one process per seed "
                   "with --seeds N --name privacy-seedN) into one table, plots and verdict")
    g.add_argument("--resume", action="store_true",
                   help="keep the conditions of OUT_DIR/NAME.partial.jsonl (written as each condition finishes) "
                   "whose fine-tuned weights hash the same as this run's, and run only the others")
    g.add_argument("--ft-cache", default=None, metavar="DIR",
                   help="keep each seed's fine-tuned weights in DIR (safetensors, keyed by the seed and the "
                   "settings) and reuse them: a run cut off resumes with --resume on the same fine-tuned model "
                   "even where the GPU fine-tune does not reproduce bit for bit")
    g.add_argument("--workers", type=int, default=None,
                   help="processes evaluating conditions side by side after the fine-tune (default 3 on cuda, "
                   "1 on cpu); on several GPUs worker i uses GPU i mod their number")
    g.add_argument("--no-progress", action="store_true")


def find_data_dir(given=None) -> Path:
    from ..data import DATA_DIR
    cands = [Path(given)] if given else [
        Path(os.environ["LIBORTHO_SHARED"]) / "data" if os.environ.get("LIBORTHO_SHARED") else None,
        Path("shared/data"), Path("../shared/data"), DATA_DIR]
    for c in cands:
        if c is not None and (c / "text" / HELDOUT_BOOK).is_file():
            return c
    raise SystemExit(f"no data folder with text/{HELDOUT_BOOK} among {[str(c) for c in cands if c]}; "
                     "pass --data-dir")


def resolve(args) -> dict:
    """Effective settings, validated, with the device-dependent defaults filled in."""
    from .canaries import DEFAULT_TEMPLATE
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(
        args.eval_dtype, torch.bfloat16 if cuda else torch.float32)
    names = [c.name for c in condition_list(args.bits, args.group_size, args.density, args.method, 0)]
    chosen = names if not args.conditions else \
        [n for n in names if n in set(args.conditions) | {"bf16-finetuned", "bf16-reference"}]
    unknown = set(args.conditions or []) - set(names)
    if unknown:
        raise SystemExit(f"unknown conditions {sorted(unknown)}; known: {names}")
    if args.ft_steps < 1:
        raise SystemExit("--ft-steps must be at least 1")
    if args.exposure == "exact" and args.digits < 2:
        raise SystemExit("--exposure exact needs --digits >= 2")
    alphas = sorted(set(args.alphas))
    return {
        "model": args.model, "device": device, "eval_dtype": dtype, "data_dir": find_data_dir(args.data_dir),
        "seeds": list(args.seeds), "n_canaries": args.canaries, "digits": args.digits,
        "template": args.template or DEFAULT_TEMPLATE, "canary_reps": args.canary_reps,
        "ft_steps": args.ft_steps, "ft_max_steps": args.ft_max_steps, "ft_target": args.ft_target,
        "ft_batch": args.ft_batch, "ft_seq_len": args.ft_seq_len,
        "ft_windows": args.ft_windows, "ft_lr": args.ft_lr, "ft_check_every": args.ft_check_every,
        "heldout_frac": args.heldout_frac, "min_extraction": args.min_extraction,
        "bits": args.bits, "group_size": args.group_size, "density": args.density, "method": args.method,
        "calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len, "conditions": chosen,
        "alphas": alphas, "exposure": args.exposure,
        "exposure_alphas": sorted(a for a in set(args.exposure_alphas) if a in alphas),
        "exposure_samples": args.exposure_samples,
        "score_batch": args.score_batch or (2048 if cuda else 64),
        "ppl_tokens": args.ppl_tokens, "ppl_seq_len": args.ppl_seq_len,
        "ppl_batch": args.ppl_batch or (8 if cuda else 1), "eval_path": args.eval_path,
        "bootstrap": args.bootstrap, "out_dir": Path(args.out_dir), "name": args.name,
        "progress": not args.no_progress, "workers": max(1, args.workers or (3 if cuda else 1)),
        "resume": args.resume, "ft_cache": args.ft_cache,
    }


# -- texts ------------------------------------------------------------------------------------------

@dataclass
class Texts:
    ft_train_ids: torch.Tensor     # first (1 - heldout_frac) of each fine-tuning book
    ft_heldout_ids: torch.Tensor   # last heldout_frac of each fine-tuning book, first ppl_tokens tokens
    heldout_ids: torch.Tensor      # the held-out public book, first ppl_tokens tokens
    calib_path: Path
    sep_ids: list[int]             # what follows a canary in a window


def load_texts(tok, s: dict) -> Texts:
    from ..data import read_text, tokenize
    from .finetune import split_heldout
    text_dir = s["data_dir"] / "text"
    parts = [split_heldout(read_text(text_dir / b), s["heldout_frac"]) for b in FT_BOOKS]
    train = "\n\n".join(p[0] for p in parts)
    held = "\n\n".join(p[1] for p in parts)
    sep = tok("\n", add_special_tokens=False)["input_ids"]
    n = s["ppl_tokens"]
    return Texts(tokenize(tok, train), _head_ids(tok, held, n), _head_ids(tok, read_text(text_dir / HELDOUT_BOOK), n),
                 text_dir / CALIB_BOOK, sep)


def _head_ids(tok, text: str, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of ``text``, tokenizing only a generous head of it when that suffices."""
    from ..data import tokenize
    ids = tokenize(tok, text[: 8 * n_tokens])
    if ids.numel() <= n_tokens and len(text) > 8 * n_tokens:
        ids = tokenize(tok, text)
    return ids[:n_tokens]


def canary_calibration(calib, enc, sep_ids: list[int]):
    """The public calibration windows with every member canary spliced in once, at window starts."""
    from ..calibrate import Calibration
    ids = calib.input_ids.clone()
    n, length = ids.shape
    offset = [0] * n
    for k in range(len(enc)):
        w = k % n
        piece = torch.cat([enc.token_ids(k), torch.tensor(sep_ids, dtype=torch.long)])
        if offset[w] + piece.numel() > length:
            raise SystemExit(f"the {len(enc)} canaries do not fit {n} calibration windows of {length} tokens")
        ids[w, offset[w]:offset[w] + piece.numel()] = piece
        offset[w] += piece.numel()
    return Calibration(ids, f"{calib.description} + the {len(enc)} member canaries spliced in once each "
                            "at window starts (PRIVATE data in calibration)")


# -- models -----------------------------------------------------------------------------------------

def _cast_params(model: nn.Module, dtype) -> nn.Module:
    """Cast parameters only (rotary and other buffers keep their dtype, as from_pretrained leaves them)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def dense_copy(model: nn.Module, alpha: float | None, dtype) -> nn.Module:
    """A copy whose OrthoLinear layers are plain linears with weight deq(Q) + alpha * S (fp32, then cast)."""
    import libortho
    from ..surgery import set_module
    out = copy.deepcopy(model)
    for name, layer in libortho.ortho_layers(out):
        w = layer.dense_weight(1.0 if alpha is None else alpha)
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                        device=w.device, dtype=torch.float32)
        with torch.no_grad():
            lin.weight.copy_(w)
            if layer.bias is not None:
                lin.bias.copy_(layer.bias.float())
        set_module(out, name, lin)
    return _cast_params(out, dtype).eval()


def build_condition(cond: Condition, finetuned, reference, calibs: dict, device):
    """A decomposed (or dense) copy of the condition's source model, on ``device``, fp32."""
    import libortho
    src = finetuned if cond.source == "finetuned" else reference
    model = copy.deepcopy(src).to(device)
    calib = calibs[cond.calib] if cond.config is not None and cond.config.needs_calibration else None
    if cond.config is not None:
        ref = reference if cond.config.base_from == "reference" else None
        libortho.decompose(model, cond.config, calib=calib, reference=ref, device=device, progress=False)
    return model.eval(), calib


def op_check(model, enc, batch: int) -> dict:
    """Max |log-lik difference| of the member secrets: OrthoLinear op (fp32) vs the dense fp32 copy."""
    import libortho
    from .canaries import secret_loglik
    out = {}
    alphas = (0.0, 1.0) if any(m.ortho_nnz for _, m in libortho.ortho_layers(model)) else (1.0,)
    for a in alphas:
        with libortho.alpha(model, a):
            ll_op = secret_loglik(model, enc, batch)
        dense = dense_copy(model, a, torch.float32)
        ll_dense = secret_loglik(dense, enc, batch)
        del dense
        out[f"{a:g}"] = float((ll_op - ll_dense).abs().max())
    return out


# -- evaluation -------------------------------------------------------------------------------------

def evaluate(model, tok, members, nonmembers, texts: Texts, s: dict, exposure: bool, seed: int) -> dict:
    from .canaries import auc, exact_exposure, greedy_extraction, sampled_exposure, secret_loglik
    from .ppl import perplexity
    t0 = time.time()
    batch = s["score_batch"]
    extracted = greedy_extraction(model, members, batch)
    ll_m, ll_n = secret_loglik(model, members, batch), secret_loglik(model, nonmembers, batch)
    d = members.secrets.shape[1]
    # membership score: minus the mean NLL of the secret digits (higher = more likely a member)
    out = {"extracted": extracted.tolist(), "ll_members": ll_m.tolist(), "ll_nonmembers": ll_n.tolist(),
           "mia_auc": auc((ll_m / d).numpy(), (ll_n / d).numpy()), "exposure": None}
    t1 = time.time()
    if exposure and s["exposure"] == "exact":
        e = exact_exposure(model, members, batch)
        out.update(exposure=e["exposure"], rank=e["rank"], exposure_method="exact")
    elif exposure and s["exposure"] == "sampled":
        e = sampled_exposure(model, members, s["exposure_samples"], seed, batch)
        out.update(exposure=e["exposure"], exposure_sampled_plain=e["exposure_sampled_plain"],
                   exposure_method=e["method"])
    t2 = time.time()
    kw = dict(seq_len=s["ppl_seq_len"], batch_size=s["ppl_batch"], progress=False)
    out["ppl_heldout"] = perplexity(model, tok, "", ids=texts.heldout_ids, **kw)
    out["ppl_ft_heldout"] = perplexity(model, tok, "", ids=texts.ft_heldout_ids, **kw)
    out["seconds"] = {"canaries": t1 - t0, "exposure": t2 - t1, "ppl": time.time() - t2}
    return out


def alpha_key(alpha: float | None) -> str:
    return NO_ALPHA if alpha is None else f"{alpha:g}"


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_seed(model0, tok, texts: Texts, s: dict, seed: int) -> dict:
    """The whole pipeline for one seed: canaries, fine-tune, check, every condition at every alpha."""
    import libortho
    from .canaries import encode_canaries, greedy_extraction, make_canaries
    from .finetune import build_training_set, finetune
    device, progress = s["device"], s["progress"]
    timings = {}
    members_c, nonmembers_c = make_canaries(s["n_canaries"], s["digits"], seed, s["template"])
    members, nonmembers = encode_canaries(tok, members_c), encode_canaries(tok, nonmembers_c)

    t = time.time()
    torch.manual_seed(seed)
    reference = copy.deepcopy(model0).to(device).eval()
    finetuned = copy.deepcopy(model0).to(device)
    data = build_training_set(texts.ft_train_ids, [members.token_ids(i) for i in range(len(members))],
                              texts.sep_ids, s["ft_seq_len"], s["ft_windows"], s["canary_reps"], seed)
    amp = torch.bfloat16 if str(device).startswith("cuda") else None
    cache = FinetuneCache(s, seed)
    log = cache.load(finetuned)
    if log is None:
        log = finetune(finetuned, data, len(members), s["ft_steps"], s["ft_batch"], s["ft_lr"], seed, amp,
                       check=lambda: greedy_extraction(finetuned, members, s["score_batch"]).float().mean(),
                       check_every=s["ft_check_every"], max_steps=s["ft_max_steps"], target=s["ft_target"],
                       progress=progress)
        cache.save(finetuned, log)
    _sync(device)
    timings["finetune"] = time.time() - t
    rate = log.extraction_curve[-1][1]
    curve = log.extraction_curve if len(log.extraction_curve) <= 8 else \
        log.extraction_curve[:4] + ["..."] + log.extraction_curve[-3:]
    print(f"[seed {seed}] fine-tuned {log.steps} steps in {log.seconds:.1f} s; greedy extraction at full "
          f"precision (fp32): {100 * rate:.1f} % (step, rate: {curve})")
    if rate < s["min_extraction"]:
        raise SystemExit(
            f"greedy extraction of the fine-tuned model at full precision is {100 * rate:.1f} %, below "
            f"--min-extraction {100 * s['min_extraction']:.0f} %: the model has not memorized the canaries, "
            "so there is nothing for the experiment to remove. No surgery was run. Train longer "
            f"(--ft-steps / --ft-max-steps, now {s['ft_steps']} / {s['ft_max_steps']}), repeat the canaries "
            f"more (--canary-reps, now {s['canary_reps']}) or raise --ft-lr (now {s['ft_lr']:g}).")

    t = time.time()
    conds = [c for c in condition_list(s["bits"], s["group_size"], s["density"], s["method"], seed)
             if c.name in s["conditions"]]
    calibs = make_calibrations(tok, texts, s, seed, members, conds)
    timings["calibration_data"] = time.time() - t

    partial = Partial(s, seed, weights_hash(finetuned))
    results = partial.load()
    todo = [c for c in conds if c.name not in results]
    if results:
        print(f"[seed {seed}] resuming: {sorted(results)} from {partial.path}; to run: {[c.name for c in todo]}")
    if s["workers"] > 1 and len(todo) > 1:
        from .privacy_workers import run_parallel
        results.update(run_parallel(finetuned, todo, s, seed, on_done=partial.add))
    else:
        for cond in tqdm(todo, desc=f"conditions (seed {seed})", disable=not progress):
            results[cond.name] = eval_condition(cond, finetuned, reference, calibs, tok, members, nonmembers,
                                                texts, s, seed)
            partial.add(cond.name, results[cond.name])
    results = {c.name: results[c.name] for c in conds}
    timings["conditions"] = {n: r["decompose_seconds"] + sum(a["seconds"]["total"] for a in r["alphas"].values())
                             for n, r in results.items()}
    _add_retention(results)
    return {"seed": seed,
            "canaries": {"members": [c.__dict__ for c in members_c], "nonmembers": [c.__dict__ for c in nonmembers_c]},
            "finetune": {"description": data.description, "steps": log.steps, "seconds": log.seconds,
                         "extraction_curve": log.extraction_curve, "final_extraction_fp32": rate,
                         "loss_first": log.losses[0] if log.losses else None,
                         "loss_last": log.losses[-1] if log.losses else None,
                         "canary_presentations": {"min": min(log.presentations), "max": max(log.presentations),
                                                  "mean": sum(log.presentations) / len(log.presentations)}},
            "calibrations": {k: v.description for k, v in calibs.items()},
            "conditions": results, "timings": timings}


class FinetuneCache:
    """A seed's fine-tuned weights (safetensors) and its log (JSON) in the ``--ft-cache`` folder, named by
    a hash of the seed and every setting that shapes the fine-tune; written atomically (tmp + rename)."""

    _KEYS = ("model", "n_canaries", "digits", "template", "canary_reps", "ft_steps", "ft_max_steps", "ft_target",
             "ft_batch", "ft_seq_len", "ft_windows", "ft_lr", "ft_check_every", "heldout_frac", "score_batch",
             "data_dir")

    def __init__(self, s: dict, seed: int):
        import hashlib
        import json
        self.dir = Path(s["ft_cache"]) if s.get("ft_cache") else None
        key = json.dumps({"seed": seed, **{k: str(s.get(k)) for k in self._KEYS}}, sort_keys=True)
        self.stem = f"finetuned-seed{seed}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"

    def load(self, model: nn.Module):
        import json

        from safetensors.torch import load_file
        from .finetune import FinetuneLog
        if self.dir is None or not (self.dir / f"{self.stem}.json").exists():
            return None
        state = load_file(str(self.dir / f"{self.stem}.safetensors"), device=str(next(model.parameters()).device))
        model.load_state_dict(state, strict=False)
        log = FinetuneLog(**json.loads((self.dir / f"{self.stem}.json").read_text()))
        log.extraction_curve = [tuple(x) for x in log.extraction_curve]
        print(f"fine-tuned weights from {self.dir / self.stem}.safetensors (--ft-cache)")
        return log

    def save(self, model: nn.Module, log) -> None:
        import dataclasses
        import json

        from safetensors.torch import save_file
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        seen, unique = set(), {}
        for k, v in state.items():  # tied weights: one copy (load_state_dict(strict=False) restores the tie)
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                unique[k] = v
        tmp = self.dir / f"{self.stem}.safetensors.tmp"
        save_file(unique, str(tmp))
        os.replace(tmp, self.dir / f"{self.stem}.safetensors")
        tmp = self.dir / f"{self.stem}.json.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(log)))
        os.replace(tmp, self.dir / f"{self.stem}.json")  # last: its presence marks a complete entry


def weights_hash(model: nn.Module) -> str:
    """sha256 over the parameters (names, dtypes, bytes): a resumed seed must have the same fine-tuned model."""
    import hashlib
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(f"{name}:{p.dtype}:{tuple(p.shape)}".encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Partial:
    """Finished conditions of one seed, one JSON line each, in OUT_DIR/NAME.partial.jsonl: a run cut off
    keeps them, and ``--resume`` takes those with the same settings and the same fine-tuned weights."""

    def __init__(self, s: dict, seed: int, ft_hash: str):
        import json
        self.path = Path(s["out_dir"]) / f"{s['name']}.partial.jsonl"
        self.seed, self.ft_hash, self.resume = seed, ft_hash, s.get("resume", False)
        self.key = json.dumps({k: str(v) for k, v in s.items() if k not in _PER_RUN}, sort_keys=True)

    def load(self) -> dict:
        import json
        if not (self.resume and self.path.exists()):
            return {}
        done, stale = {}, 0
        for line in self.path.read_text().splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off mid-write
            if e.get("seed") != self.seed or e.get("settings") != self.key:
                continue
            if e.get("ft_hash") != self.ft_hash:
                stale += 1
                continue
            done[e["condition"]] = e["row"]
        if stale:
            print(f"[seed {self.seed}] WARNING: {stale} condition(s) in {self.path} came from a different "
                  "fine-tuned model (the fine-tune did not reproduce bit for bit); running them again")
        return done

    def add(self, name: str, row: dict) -> None:
        import json
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"seed": self.seed, "condition": name, "ft_hash": self.ft_hash,
                                "settings": self.key, "row": row}) + "\n")


def make_calibrations(tok, texts: Texts, s: dict, seed: int, members, conds) -> dict:
    """The calibration sets the conditions need (deterministic in ``seed``, so workers rebuild them)."""
    import libortho
    calibs = {}
    if any(c.calib for c in conds):
        calibs["public"] = libortho.calibration_data(tok, [texts.calib_path], s["calib_samples"],
                                                     s["calib_seq_len"], seed)
        calibs["public+canary"] = canary_calibration(calibs["public"], members, texts.sep_ids)
    return calibs


def eval_condition(cond: Condition, finetuned, reference, calibs: dict, tok, members, nonmembers, texts: Texts,
                   s: dict, seed: int) -> dict:
    """Decompose one condition once and evaluate it at every alpha: one row of the results."""
    import libortho
    device = next(finetuned.parameters()).device
    t = time.time()
    model, calib = build_condition(cond, finetuned, reference, calibs, device)
    _sync(device)
    t_dec = time.time() - t
    row = {"description": cond.description, "source": cond.source,
           "config": None if cond.config is None else cond.config.to_dict(),
           "calibration": None if calib is None else calib.description,
           "decompose_seconds": t_dec, "alphas": {}}
    if cond.config is not None:
        rep = libortho.report(model)["total"]
        row.update(bits_per_weight=rep["bits_per_weight"], base_bits_per_weight=rep["base_bits_per_weight"],
                   density=rep["density"])
        row["op_check_max_abs_dll"] = op_check(model, members, s["score_batch"])
    else:
        bits = 8 * torch.empty(0, dtype=s["eval_dtype"]).element_size()
        row.update(bits_per_weight=float(bits), base_bits_per_weight=float(bits), density=0.0)
    for alpha in (s["alphas"] if cond.has_alpha else [None]):
        t = time.time()
        if s["eval_path"] == "op" and cond.config is not None:
            libortho.set_alpha(model, 1.0 if alpha is None else alpha)
            evaluated = _cast_params(model, s["eval_dtype"])
        else:
            evaluated = dense_copy(model, alpha, s["eval_dtype"])
        want_exposure = s["exposure"] != "none" and (alpha is None or alpha in s["exposure_alphas"])
        res = evaluate(evaluated, tok, members, nonmembers, texts, s, want_exposure, seed)
        if evaluated is not model:
            del evaluated
        _sync(device)
        res["seconds"]["total"] = time.time() - t
        row["alphas"][alpha_key(alpha)] = res
        print(f"  [seed {seed}] {cond.name:32s} alpha={alpha_key(alpha):5s} extraction "
              f"{100 * _mean(res['extracted']):5.1f} %  exposure {_fmt(_mean(res['exposure']))}  "
              f"AUC {res['mia_auc']:.3f}  ppl {res['ppl_heldout']:.2f}  ({res['seconds']['total']:.1f} s)", flush=True)
    del model
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def _add_retention(results: dict) -> None:
    """(PPL_ref - PPL_cond) / (PPL_ref - PPL_ft) on the held-out part of the fine-tuning books."""
    p_ref = results["bf16-reference"]["alphas"][NO_ALPHA]["ppl_ft_heldout"]
    p_ft = results["bf16-finetuned"]["alphas"][NO_ALPHA]["ppl_ft_heldout"]
    gain = p_ref - p_ft
    for row in results.values():
        for res in row["alphas"].values():
            res["retention"] = (p_ref - res["ppl_ft_heldout"]) / gain if abs(gain) > 1e-9 else None


def _mean(values):
    if not values:
        return None
    vals = [float(v) for v in values]
    return sum(vals) / len(vals)


def _fmt(x, digits=2):
    return "   -  " if x is None else f"{x:6.{digits}f}"


# -- running --------------------------------------------------------------------------------------

def command_line() -> str:
    argv = sys.argv[1:]
    if argv[:2] == ["experiment", "privacy"]:
        return "libortho " + shlex.join(argv)
    return "(called in-process) " + shlex.join(sys.argv)


def environment(device: str) -> dict:
    from .report_util import environment as stamp
    env = stamp(device)
    env.update(command=command_line(), device_kind=device, python=platform.python_version())
    return env


def run(args) -> dict:
    import libortho
    if args.merge:
        return merge(args)
    s = resolve(args)
    t0 = time.time()
    print(protocol_text(s))
    model0, tok = libortho.load_model(s["model"])
    model0 = _cast_params(model0, torch.float32).eval()
    texts = load_texts(tok, s)
    t_load = time.time() - t0
    if not s["resume"]:
        (s["out_dir"] / f"{s['name']}.partial.jsonl").unlink(missing_ok=True)
    per_seed = [run_seed(model0, tok, texts, s, seed) for seed in s["seeds"]]
    result = aggregate(per_seed, s)
    result.update(experiment="privacy", command=command_line(), model=s["model"], seeds=s["seeds"],
                  environment=environment(s["device"]), protocol=protocol_text(s),
                  settings={k: (str(v) if isinstance(v, (Path, torch.dtype)) else v) for k, v in s.items()},
                  timings={"load_seconds": t_load, "total_seconds": time.time() - t0,
                           "per_seed": [r["timings"] for r in per_seed]},
                  per_seed=per_seed)
    paths = write_outputs(result, s)
    (s["out_dir"] / f"{s['name']}.partial.jsonl").unlink(missing_ok=True)  # the result holds every row now
    print("\n" + result["table_markdown"])
    print("\n" + "\n".join(result["verdict"]))
    print(f"\ntotal {time.time() - t0:.0f} s; wrote " + ", ".join(str(p) for p in paths))
    return result



# -- aggregation over seeds ---------------------------------------------------------------------------

_PER_RUN = {"seeds", "out_dir", "name", "progress", "device", "workers", "resume", "ft_cache"}
_MERGE_MAY_DIFFER = {"exposure_alphas"}  # runs computing exposure at more alphas still pool


def merge(args) -> dict:
    """Pool the per-seed results of several runs with identical settings into one result."""
    import json
    runs = [json.loads(Path(p).read_text()) for p in args.merge]
    s = dict(runs[0]["settings"])
    for p, r in zip(args.merge[1:], runs[1:]):
        diff = sorted(k for k in set(s) | set(r["settings"]) if k not in _PER_RUN | _MERGE_MAY_DIFFER
                      and s.get(k) != r["settings"].get(k))
        if diff:
            raise SystemExit(f"{p} was run with other settings than {args.merge[0]}: {diff}")
    # exposure where every run computed it (the table leaves the others out)
    s["exposure_alphas"] = sorted(set.intersection(*(set(r["settings"]["exposure_alphas"]) for r in runs)))
    per_seed = [ps for r in runs for ps in r["per_seed"]]
    seeds = [ps["seed"] for ps in per_seed]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"the merged runs repeat seeds: {seeds}")
    s.update(seeds=seeds, out_dir=Path(args.out_dir), name=args.name)
    result = aggregate(per_seed, s)
    result.update(experiment="privacy", command=" && ".join(r["command"] for r in runs)
                  + f" && {command_line()}", merged_from=[str(p) for p in args.merge], model=s["model"],
                  seeds=seeds, environment=runs[0]["environment"], protocol=protocol_text(s),
                  settings={k: str(v) if isinstance(v, Path) else v for k, v in s.items()},
                  timings={"per_run": [r["timings"] for r in runs]}, per_seed=per_seed)
    paths = write_outputs(result, s)
    print(result["table_markdown"] + "\n\n" + "\n".join(result["verdict"]))
    print("wrote " + ", ".join(str(p) for p in paths))
    return result


def aggregate(per_seed: list[dict], s: dict) -> dict:
    """Means over seeds; bootstrap CIs over the canaries pooled across seeds."""
    from .canaries import bootstrap_auc_ci, bootstrap_ci
    n_boot, bseed, d = s["bootstrap"], s["seeds"][0], s["digits"]
    results, rows = {}, []
    for name in s["conditions"]:
        runs = [r["conditions"][name] for r in per_seed]
        meta = runs[0]
        entry = {k: meta[k] for k in ("description", "source", "config", "bits_per_weight",
                                      "base_bits_per_weight", "density")}
        entry["calibration"] = [r["calibration"] for r in runs]
        if "op_check_max_abs_dll" in meta:
            entry["op_check_max_abs_dll"] = max(max(r["op_check_max_abs_dll"].values()) for r in runs)
        entry["alphas"] = {}
        for key in meta["alphas"]:
            per = [r["alphas"][key] for r in runs]
            extracted = [float(x) for p in per for x in p["extracted"]]
            res = {"extraction": _mean(extracted), "extraction_ci": bootstrap_ci(extracted, n_boot, bseed),
                   "exposure_mean": None, "exposure_ci": None, "exposure_method": None}
            if all(p["exposure"] is not None for p in per):
                exp = [x for p in per for x in p["exposure"]]
                res.update(exposure_mean=_mean(exp), exposure_ci=bootstrap_ci(exp, n_boot, bseed),
                           exposure_method=per[0]["exposure_method"])
            pos = [[v / d for v in p["ll_members"]] for p in per]
            neg = [[v / d for v in p["ll_nonmembers"]] for p in per]
            res["mia_auc"] = _mean([p["mia_auc"] for p in per])
            res["mia_auc_ci"] = bootstrap_auc_ci(pos, neg, n_boot, bseed)
            for k in ("ppl_heldout", "ppl_ft_heldout"):
                res[k] = _mean([p[k] for p in per])
            ret = [p["retention"] for p in per]
            res["retention"] = None if any(r is None for r in ret) else _mean(ret)
            res["n_canaries"] = len(extracted)
            res["per_seed"] = {k: [p[k] for p in per]
                               for k in ("mia_auc", "ppl_heldout", "ppl_ft_heldout", "retention")}
            res["per_seed"]["extraction"] = [_mean(p["extracted"]) for p in per]
            res["per_seed"]["exposure_mean"] = [_mean(p["exposure"]) for p in per]
            entry["alphas"][key] = res
            rows.append({"condition": name, "alpha": None if key == NO_ALPHA else float(key),
                         "bits_per_weight": entry["bits_per_weight"],
                         **{k: v for k, v in res.items() if k != "per_seed"}})
        results[name] = entry
    out = {"results": results, "rows": rows}
    out["table_markdown"] = table_markdown(rows, s)
    out["verdict"] = verdict(results, s)
    return out


# -- report -------------------------------------------------------------------------------------------

def protocol_text(s: dict) -> str:
    D, N = s["digits"], s["n_canaries"]
    q = f"INT{s['bits']} g{s['group_size']} symmetric"
    if s["exposure"] == "exact":
        exposure = (f"exact: every one of the 10^{D} candidates is scored (prefix tree over the digits: one pass "
                    f"over prefix + {max(D - 2, 0)} digits, then 10 cached one-token branches; batched across "
                    "canaries), rank with ties at mid-rank")
    elif s["exposure"] == "sampled":
        exposure = (f"estimated from {s['exposure_samples']} random candidates per canary by the skew-normal "
                    "extrapolation of Carlini et al. (the plain sampled rank is stored too)")
    else:
        exposure = "not computed"
    ea = ", ".join(f"{a:g}" for a in s["exposure_alphas"])
    extension = (f" (extended up to {s['ft_max_steps']} until greedy extraction reaches {100 * s['ft_target']:g} %)"
                 if s["ft_max_steps"] > s["ft_steps"] else "")
    return "\n".join([
        f"Privacy protocol ({s['model']}, seeds {s['seeds']}):",
        f"* Canaries: {N} members + {N} unseen non-members from {s['template']!r}, each with its own name "
        f"(distinct prefixes) and a uniform {D}-digit secret (|R| = 10^{D}); seeded.",
        f"* Fine-tune: full fine-tune (AdamW lr {s['ft_lr']:g}, linear warm-up, grad clip 1; bf16 autocast on "
        f"GPU, fp32 on CPU) for {s['ft_steps']} steps{extension} of {s['ft_batch']} windows x {s['ft_seq_len']} "
        "tokens from "
        f"{' + '.join(FT_BOOKS)} (first {100 * (1 - s['heldout_frac']):g} % of each book; the last "
        f"{100 * s['heldout_frac']:g} % is never fine-tuned on and is the retention text); each member canary "
        f"starts {s['canary_reps']} windows of the set. Greedy extraction at fp32 must reach "
        f"{100 * s['min_extraction']:g} % before any surgery.",
        f"* Conditions at {q}, ortho density {100 * s['density']:g} %, method {s['method']} for the ortho "
        f"conditions; calibration {s['calib_samples']} x {s['calib_seq_len']} tokens of {CALIB_BOOK} (public), "
        "plus the member canaries for libortho-hessian-public+canary. Reference = the model before fine-tuning. "
        "Caveat: SmolLM2 is distributed on a Q4_1 grid (asymmetric g32); the bases here are symmetric.",
        f"* Evaluation in {str(s['eval_dtype']).replace('torch.', '')} as dense linears W = deq(Q) + alpha * S "
        f"({s['eval_path']} path; the op is checked against the dense copy in fp32). Alphas "
        f"{', '.join(f'{a:g}' for a in s['alphas'])} for extraction, membership AUC and perplexities; exposure at "
        f"alpha {ea} (and once for conditions without an ortho stream).",
        f"* Extraction: greedy decoding (full vocabulary) of {D} tokens after the prefix reproduces the secret.",
        f"* Exposure (Carlini et al., The Secret Sharer) = log2 10^{D} - log2 rank of the secret among all "
        f"candidates by the log-likelihood of its digits given the prefix; {exposure}. Max {math.log2(10 ** D):.2f} "
        "bits; a secret the model never saw has mean exposure about log2(e) = 1.44 bits.",
        "* Membership: AUC (rank-sum formula) of members vs non-members scored by minus the mean NLL of the "
        "secret digits given the prefix (0.5 = no signal).",
        f"* Perplexity: exp(mean token NLL) over non-overlapping {s['ppl_seq_len']}-token windows of the first "
        f"{s['ppl_tokens']} tokens of {HELDOUT_BOOK} (held-out public text). Retention = (PPL_ref - PPL_cond) / "
        "(PPL_ref - PPL_ft) on the held-out last part of the fine-tuning books (bf16-reference and "
        "bf16-finetuned give PPL_ref and PPL_ft).",
        f"* CIs: 95 % percentile bootstrap over canaries ({s['bootstrap']} resamples, seeded), pooled over "
        "seeds; table values are means over seeds.",
    ])


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f} %"


def _ci(ci, scale=1.0, digits=1):
    return "" if ci is None else f" [{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]"


def table_markdown(rows: list[dict], s: dict) -> str:
    head = ("| condition | alpha | bits/weight | extraction [95 % CI] | exposure, bits [95 % CI] | MIA AUC [95 % CI] "
            "| PPL held-out | PPL ft-held-out | retention |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        exp = "-" if r["exposure_mean"] is None else f"{r['exposure_mean']:.2f}{_ci(r['exposure_ci'], digits=2)}"
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:g}"
        ret = "-" if r["retention"] is None else f"{r['retention']:.2f}"
        lines.append(
            f"| {r['condition']} | {alpha} | {r['bits_per_weight']:.3f} | "
            f"{_pct(r['extraction'])}{_ci(r['extraction_ci'], 100)} | {exp} | "
            f"{r['mia_auc']:.3f}{_ci(r['mia_auc_ci'], digits=3)} | {r['ppl_heldout']:.3f} | "
            f"{r['ppl_ft_heldout']:.3f} | {ret} |")
    return "\n".join(lines)


def _get(results, name, key):
    return results.get(name, {}).get("alphas", {}).get(key)


def verdict(results: dict, s: dict) -> list[str]:
    """Plain-language reading of the numbers, with the criteria spelled out."""
    out = []
    ft, ref = _get(results, "bf16-finetuned", NO_ALPHA), _get(results, "bf16-reference", NO_ALPHA)
    ref_exp = ref["exposure_mean"]
    out.append(f"Memorization: the fine-tuned model extracts {_pct(ft['extraction'])} of the canaries"
               + ("" if ft["exposure_mean"] is None else f" (mean exposure {ft['exposure_mean']:.2f} bits)")
               + f"; the reference model, which never saw them, {_pct(ref['extraction'])}"
               + ("" if ref_exp is None else f" ({ref_exp:.2f} bits)") + ".")
    memorized = ft["extraction"] > 0 and ft["extraction"] >= s["min_extraction"]
    if not memorized:
        out.append(f"WARNING: the fine-tuned model extracts only {_pct(ft['extraction'])} of the canaries (the run "
                   f"allowed --min-extraction {s['min_extraction']:g}): there is no memorization to remove, so no "
                   "removal below is evidence for the hypothesis.")
    gain = (ref["ppl_ft_heldout"] - ft["ppl_ft_heldout"]) / ref["ppl_ft_heldout"]
    if gain < 0.02:
        out.append(f"Caution: the fine-tune did not lower the held-out in-domain perplexity by at least 2 % "
                   f"({ref['ppl_ft_heldout']:.2f} -> {ft['ppl_ft_heldout']:.2f}, {100 * -gain:+.1f} %), so retention "
                   "is not meaningful here.")
    int_gptq = _get(results, f"int{s['bits']}-gptq", NO_ALPHA)
    held, vacuous = [], []
    for name in ("libortho-hessian-public", "libortho-hessian-public+canary", "libortho-delta"):
        one, zero = _get(results, name, "1"), _get(results, name, "0")
        if one is None or zero is None:
            continue
        removed_ext = zero["extraction"] <= max(0.05, ref["extraction"])
        removed_exp = zero["exposure_mean"] is None or ref_exp is None or zero["exposure_mean"] <= ref_exp + 1.0
        removed = removed_ext and removed_exp
        kept = zero["ppl_heldout"] <= 1.10 * ft["ppl_heldout"]
        line = (f"{name}: alpha=1 extracts {_pct(one['extraction'])}"
                + ("" if one["exposure_mean"] is None else f" (exposure {one['exposure_mean']:.2f})")
                + f", alpha=0 extracts {_pct(zero['extraction'])}"
                + ("" if zero["exposure_mean"] is None else f" (exposure {zero['exposure_mean']:.2f})")
                + f"; held-out PPL at alpha=0 {zero['ppl_heldout']:.2f} "
                f"({100 * (zero['ppl_heldout'] / ft['ppl_heldout'] - 1):+.1f} % vs bf16-finetuned"
                + ("" if int_gptq is None else f"; plain INT{s['bits']} GPTQ {int_gptq['ppl_heldout']:.2f}") + "). "
                f"Secrets removed at alpha=0: {'YES' if removed else 'NO'} (criterion: extraction <= "
                f"max(5 %, reference) and mean exposure within 1 bit of the reference model's); general ability "
                f"kept: {'YES' if kept else 'NO'} (criterion: held-out PPL within 10 % of bf16-finetuned).")
        if not kept and int_gptq is not None and zero["ppl_heldout"] <= 1.05 * int_gptq["ppl_heldout"]:
            line += (f" The loss is that of the {s['bits']}-bit base itself: plain INT{s['bits']} GPTQ of the "
                     "fine-tuned model is no better.")
        lost = not memorized or one["extraction"] < 0.5 * ft["extraction"]
        if memorized and lost:
            line += (" Note: at alpha=1 the decomposition already lost most of the memorization (less than half of "
                     "the fine-tuned model's extraction), so alpha=0 has little left to remove.")
        out.append(line)
        if removed and kept:
            (vacuous if lost else held).append(name)
    summary = "Hypothesis 'alpha=0 removes memorized secrets while keeping general ability': "
    summary += f"HOLDS for {', '.join(held)}." if held else "does NOT hold for any LibOrtho condition here."
    if vacuous:
        summary += (f" For {', '.join(vacuous)} the criteria are met only vacuously: "
                    + ("the fine-tuned model had not memorized the secrets." if not memorized else
                       "alpha=1 had already lost the secrets, so the kill switch is not what removed them."))
    out.append(summary)
    out += _sieve_verdict(results, s)
    return out


def _compare_ci(a, b) -> str:
    """'lower' / 'higher' when the 95 % CIs of a and b are disjoint, else 'indistinguishable'."""
    if a["exposure_ci"] is None or b["exposure_ci"] is None:
        return "not measured"
    if a["exposure_ci"][1] < b["exposure_ci"][0]:
        return "lower"
    if a["exposure_ci"][0] > b["exposure_ci"][1]:
        return "higher"
    return "indistinguishable (CIs overlap)"


def _exp(r) -> str:
    return "-" if r["exposure_mean"] is None else f"{r['exposure_mean']:.2f}{_ci(r['exposure_ci'], digits=2)}"


def _sieve_verdict(results: dict, s: dict) -> list[str]:
    h0, h1 = _get(results, "libortho-hessian-public", "0"), _get(results, "libortho-hessian-public", "1")
    if h0 is None or h1 is None:
        return []
    out = []
    for ctrl in ("random", "magnitude"):
        c0, c1 = _get(results, ctrl, "0"), _get(results, ctrl, "1")
        if c0 is None or c1 is None:
            continue
        removal = _compare_ci(h0, c0)
        ppl_ratio = h1["ppl_heldout"] / c1["ppl_heldout"]
        utility = "better" if ppl_ratio < 0.99 else "worse" if ppl_ratio > 1.01 else "equal (within 1 %)"
        removal_better = removal == "lower" or (removal == "not measured" and h0["extraction"] < c0["extraction"])
        removal_worse = removal == "higher" or (removal == "not measured" and h0["extraction"] > c0["extraction"])
        beats = not removal_worse and utility != "worse" and (removal_better or utility == "better")
        out.append(
            f"Hessian sieve vs {ctrl} at the same density: exposure at alpha=0 {_exp(h0)} vs {_exp(c0)}"
            + f" ({removal}); extraction at alpha=0 {_pct(h0['extraction'])} vs {_pct(c0['extraction'])}, at alpha=1 "
            f"{_pct(h1['extraction'])} vs {_pct(c1['extraction'])}; "
            f"held-out PPL at alpha=1 {h1['ppl_heldout']:.2f} vs {c1['ppl_heldout']:.2f} ({utility}). "
            + ("The Hessian sieve BEATS this control." if beats else
               "The Hessian sieve does NOT beat this control (criterion: removal at alpha=0 no worse, utility at "
               "alpha=1 no worse, and better on at least one)."))
    return out


def plot_alpha(results: dict, s: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, entry) in enumerate(results.items()):
        color = cycle[i % len(cycle)]
        for ax, key, scale in ((axes[0], "extraction", 100), (axes[1], "exposure_mean", 1)):
            if NO_ALPHA in entry["alphas"]:
                v = entry["alphas"][NO_ALPHA][key]
                if v is not None:
                    ax.axhline(scale * v, color=color, ls="--", lw=1, label=name)
                continue
            pts = [(float(a), r[key]) for a, r in entry["alphas"].items() if r[key] is not None]
            if pts:
                pts.sort()
                ax.plot([p[0] for p in pts], [scale * p[1] for p in pts], "o-", color=color, label=name)
    axes[0].set(xlabel="alpha", ylabel="greedy extraction (%)", title="extraction vs alpha")
    axes[1].set(xlabel="alpha", ylabel="mean exposure (bits)", title="exposure vs alpha")
    axes[1].axhline(math.log2(10 ** s["digits"]), color="grey", lw=0.5)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"privacy: {s['model']}, {s['n_canaries']} member canaries per seed, seeds {s['seeds']} "
                 "(dashed: conditions without alpha)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_frontier(results: dict, s: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, entry) in enumerate(results.items()):
        pts = sorted((r["ppl_heldout"], r["exposure_mean"], a) for a, r in entry["alphas"].items()
                     if r["exposure_mean"] is not None)
        if not pts:
            continue
        color = cycle[i % len(cycle)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) > 1 else "s", color=color, label=name)
        for x, y, a in pts:
            if a != NO_ALPHA:
                ax.annotate(f"a={a}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    lo, hi = ax.get_xlim()
    if lo > 0 and hi / lo > 3:
        ax.set_xscale("log")
    ax.set(xlabel=f"held-out perplexity ({HELDOUT_BOOK})", ylabel="mean exposure (bits)",
           title="privacy / utility frontier (lower-left is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def markdown(result: dict, s: dict) -> str:
    env = result["environment"]
    lines = [f"# Privacy: canary extraction and exposure vs alpha ({s['model']})", "",
             f"Command: `{result['command']}`  ", f"Seeds: {s['seeds']}; device: {env['device']}; "
             f"torch {env['torch']}, transformers {env['transformers']}; {env['date']}", "",
             "## Protocol", "", result["protocol"], "", "## Results", "", result["table_markdown"], "",
             "Bits per weight count every stored array of the decomposed linears (base, scales, CSR); "
             "at alpha=0 only the base is read.", "", "## Verdict", ""]
    lines += [f"- {v}" for v in result["verdict"]]
    lines += ["", "## Calibration and bits per condition", ""]
    for name, e in result["results"].items():
        cal = e["calibration"][0] if e["calibration"] and e["calibration"][0] else "none"
        lines.append(f"- {name}: {e['description']}; {e['bits_per_weight']:.3f} bits/weight; calibration: {cal}")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, s: dict) -> list[Path]:
    from .report_util import write_json, write_text
    out = s["out_dir"]
    out.mkdir(parents=True, exist_ok=True)
    stem = s["name"]
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}-alpha.png", out / f"{stem}-frontier.png"]
    result["figures"] = [p.name for p in paths[2:]]
    write_json(paths[0], result)
    write_text(paths[1], markdown(result, s))
    try:
        plot_alpha(result["results"], s, paths[2])
        plot_frontier(result["results"], s, paths[3])
    except ImportError as e:  # e.g. a GPU machine without matplotlib: re-render later from the JSON
        print(f"no plots ({e}); render them elsewhere with: libortho experiment privacy --merge {paths[0]}")
        return paths[:2]
    return paths
