"""``libortho experiment genius``: few-shot arithmetic accuracy of SmolLM2 under aggressive bases.

Each condition (bf16, RTN and GPTQ bases at INT4/3/2, INT3 + ortho at several densities, a random-score
control, a task-calibrated variant) is decomposed once from a copy of the fp32 model and evaluated on
every task (greedy 5-shot, :mod:`libortho.eval.fewshot`) and on held-out perplexity. Results go to
``genius.json``, ``genius.md`` and ``genius.png`` (:mod:`libortho.eval.genius_report`).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import OrthoConfig
from .fewshot import TASKS, evaluate_task, fewshot_overlap, task_calibration_text  # noqa: F401
from .genius_report import _one_line, add_retention  # noqa: F401

PUBLIC_CALIB = "austen-emma.txt"
PPL_TEXT = "austen-prideprejudice.txt"
QUICK_CONDITIONS = ("bf16", "int3-base", "gptq-int3", "int3-ortho-1%", "random-1%")


@dataclass(frozen=True)
class Condition:
    """One row: ``config`` None is the dense model; ``calib`` names the calibration source."""
    name: str
    config: OrthoConfig | None = None
    calib: str | None = None  # "public" or "tasks" (only for configs that need calibration)
    alpha0: bool = False  # also evaluate at alpha = 0 by default (the base alone)


def _ortho(bits, group_size, density, score="hessian"):
    return OrthoConfig(bits=bits, group_size=group_size, density=density, score=score, method="gptq")


def default_conditions(seed: int = 0) -> list[Condition]:
    base = OrthoConfig.base_only
    rows = [
        Condition("bf16"),
        Condition("int4-base", base(bits=4, group_size=128, method="rtn")),
        Condition("gptq-int4", base(bits=4, group_size=128, method="gptq"), "public"),
        Condition("int4-ortho-1%", _ortho(4, 128, 0.01), "public", alpha0=True),
        Condition("int3-base", base(bits=3, group_size=128, method="rtn")),
        Condition("gptq-int3", base(bits=3, group_size=128, method="gptq"), "public"),
    ]
    rows += [Condition(f"int3-ortho-{d:g}%", _ortho(3, 128, d / 100), "public", alpha0=d in (1, 5))
             for d in (0.5, 1, 2, 5)]
    rows += [
        Condition("int3-ortho-1%-taskcalib", _ortho(3, 128, 0.01), "tasks"),
        Condition("random-1%", _ortho(3, 128, 0.01, score="random"), "public", alpha0=True),
        Condition("int2-base", base(bits=2, group_size=64, method="rtn")),
        Condition("gptq-int2", base(bits=2, group_size=64, method="gptq"), "public"),
        Condition("int2-ortho-2%", _ortho(2, 64, 0.02), "public", alpha0=True),
    ]
    return [c if c.config is None else Condition(c.name, c.config.replace(seed=seed), c.calib, c.alpha0)
            for c in rows]


def select_conditions(names, seed: int = 0) -> list[Condition]:
    """The named conditions in registry order, bf16 always first (it is the retention reference)."""
    table = {c.name: c for c in default_conditions(seed)}
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown condition(s) {unknown}; known: {list(table)}")
    wanted = set(names) | {"bf16"}
    return [c for c in table.values() if c.name in wanted]


# -- calibration ----------------------------------------------------------------------------------------

def make_calibrations(tokenizer, needed, data_dir, tasks, n_samples: int, seq_len: int, seed: int) -> dict:
    import libortho
    out = {}
    data_dir = Path(data_dir)
    if "public" in needed:
        out["public"] = libortho.calibration_data(tokenizer, [data_dir / "text" / PUBLIC_CALIB],
                                                  n_samples, seq_len, seed)
    if "tasks" in needed:
        text = task_calibration_text(tokenizer, tasks, data_dir / "reasoning", n_samples * seq_len, seed)
        out["tasks"] = libortho.calibration_data(
            tokenizer, text, n_samples, seq_len, seed,
            name=f"the few-shot files of {'+'.join(tasks)} (reshuffled, repeated; TASK DATA)")
    return out


# -- building and evaluating one condition --------------------------------------------------------------

def cast_params(model, dtype) -> None:
    """Cast parameters only: buffers (rotary inv_freq, OrthoLinear arrays) keep their dtype, as
    ``from_pretrained(dtype=...)`` would leave the rotary buffers."""
    for p in model.parameters():
        p.data = p.data.to(dtype)


def eval_config(config: OrthoConfig, dtype) -> OrthoConfig:
    """The config as decomposed for evaluation in ``dtype``: with bf16 activations the scales and ortho
    values are stored (and the grid fitted) in bf16, so no kernel re-rounds fp16 scales at run time."""
    return config.replace(dtype="bfloat16") if dtype == torch.bfloat16 else config


def build_condition(base_model, cond: Condition, calibs: dict, device, dtype):
    """A fresh copy of ``base_model`` (fp32) decomposed by ``cond`` and cast for evaluation."""
    import libortho
    model = copy.deepcopy(base_model)
    if cond.config is not None:
        calib = calibs[cond.calib] if cond.config.needs_calibration else None
        libortho.decompose(model, eval_config(cond.config, dtype), calib=calib, device=device, progress=False)
    cast_params(model, dtype)
    return model.to(device).eval()


def evaluate_model(model, tok, tasks, data_dir, ppl_ids, settings: dict, progress: bool = True) -> dict:
    from .ppl import perplexity
    res = {t: evaluate_task(model, tok, t, data_dir, settings.get("n_test"), settings.get("batch_size", 64),
                            settings.get("max_new_tokens", 8), settings.get("shots", 5), progress)
           for t in tasks}
    ppl = None
    if ppl_ids is not None:
        ppl = perplexity(model, tok, "", seq_len=settings.get("ppl_seq_len", 2048), ids=ppl_ids,
                         batch_size=settings.get("ppl_batch_size", 1), progress=False)
    return {"tasks": res, "ppl": ppl}


def _row(name, cond, alpha, model, calibs, evaluated, secs_decompose, secs_eval, dtype) -> dict:
    import libortho
    row = {"name": name, "config": None if cond.config is None else eval_config(cond.config, dtype).to_dict(),
           "calibration": None, "alpha": alpha, "dtype": str(dtype).replace("torch.", ""),
           "bits_per_weight": 8.0 * torch.empty(0, dtype=dtype).element_size(),  # dense rows
           "base_bits_per_weight": None, "ortho_density": 0.0}
    if cond.config is not None:
        tot = libortho.report(model)["total"]
        row["base_bits_per_weight"] = tot["base_bits_per_weight"]
        # base-only rows and alpha=0 rows need no ortho arrays (report() counts the empty row_ptr too)
        with_ortho = alpha != 0 and cond.config.has_ortho
        row["bits_per_weight"] = tot["bits_per_weight"] if with_ortho else tot["base_bits_per_weight"]
        row["ortho_density"] = tot["density"] if alpha != 0 else 0.0
        if cond.config.needs_calibration:
            row["calibration"] = calibs[cond.calib].description
    row.update(evaluated)
    row["decompose_s"], row["eval_s"] = secs_decompose, secs_eval
    return row


def run_conditions(base_model, tok, conditions, tasks, data_dir, device, dtype=torch.bfloat16, calibs=None,
                   ppl_ids=None, settings: dict | None = None, alpha0: str = "some", progress: bool = True,
                   log=print) -> list[dict]:
    """Decompose each condition once from ``base_model`` (fp32) and evaluate every task and ppl on it.

    ``alpha0``: "some" (the conditions marked alpha0), "all" (every ortho row) or "none": also evaluate
    those at alpha = 0 (the base alone; bits_per_weight is then the base's). Returns one row per
    evaluated model, without retention columns (see :func:`add_retention`).
    """
    import libortho
    settings, calibs, rows = settings or {}, calibs or {}, []
    bar = tqdm(conditions, desc="conditions", disable=not progress)
    for cond in bar:
        bar.set_postfix_str(cond.name)
        t0 = time.time()
        model = build_condition(base_model, cond, calibs, device, dtype)
        _sync(device)
        t1 = time.time()
        evaluated = evaluate_model(model, tok, tasks, data_dir, ppl_ids, settings, progress)
        rows.append(_row(cond.name, cond, 1.0 if cond.config else None, model, calibs, evaluated,
                         t1 - t0, time.time() - t1, dtype))
        log(_one_line(rows[-1]))
        has_ortho = cond.config is not None and cond.config.has_ortho
        if has_ortho and (alpha0 == "all" or alpha0 == "some" and cond.alpha0):
            t1 = time.time()
            with libortho.alpha(model, 0.0):
                evaluated = evaluate_model(model, tok, tasks, data_dir, ppl_ids, settings, progress)
            rows.append(_row(f"{cond.name}@alpha0", cond, 0.0, model, calibs, evaluated, 0.0,
                             time.time() - t1, dtype))
            log(_one_line(rows[-1]))
        del model
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# -- the command: libortho experiment genius ------------------------------------------------------------

QUICK = {"n_test": 40, "calib_samples": 8, "calib_seq_len": 128, "ppl_tokens": 4096}
FULL = {"n_test": None, "calib_samples": 128, "calib_seq_len": 512, "ppl_tokens": 32768}


def add_arguments(p) -> None:
    names = [c.name.replace("%", "%%") for c in default_conditions()]  # argparse help is %-formatted
    p.add_argument("--model", default="smollm2", help="smollm2 (default), a HF directory or a .gguf file")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="evaluation dtype (auto: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--data-dir", default=None, help="the shared data folder (holding reasoning/ and text/); "
                   "default: $LIBORTHO_DATA, else shared/data beside or inside the checkout")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--n-test", type=int, default=None, help="test items per task (default all 500)")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=None, help="prompts per generate batch (256 cuda, 32 cpu)")
    p.add_argument("--conditions", nargs="+", default=None, metavar="NAME",
                   help=f"subset of {' '.join(names)} (bf16 always runs: it is the reference)")
    p.add_argument("--alpha0", default="some", choices=["some", "all", "none"],
                   help="which ortho rows are also evaluated at alpha=0 (some: int4-ortho-1%%, int3-ortho-1%%, "
                   "int3-ortho-5%%, random-1%%, int2-ortho-2%%)")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default 128)")
    p.add_argument("--calib-seq-len", type=int, default=None, help="tokens per window (default 512)")
    p.add_argument("--ppl-tokens", type=int, default=None, help=f"tokens of {PPL_TEXT} (default 32768)")
    p.add_argument("--ppl-seq-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0, help="calibration windows and the random-score mask")
    p.add_argument("--out-dir", default="experiments/results")
    p.add_argument("--name", default=None, help="output file stem (default genius, genius-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke settings: 40 items, 8 x 128 calibration, "
                   f"4096 ppl tokens, conditions {' '.join(QUICK_CONDITIONS).replace('%', '%%')}")
    p.add_argument("--workers", type=int, default=None,
                   help="processes sharing the device, each decomposing and evaluating whole conditions "
                   "(default 4 on cuda: the GPTQ sweep is launch-bound; 1 on cpu)")
    p.add_argument("--resume", action="store_true",
                   help="keep the conditions already in OUT_DIR/NAME.partial.jsonl (written as each condition "
                   "finishes) and run only the others")
    p.add_argument("--list", action="store_true", help="list the conditions and exit")
    p.add_argument("--no-progress", action="store_true")


def find_data_dir(given=None) -> Path:
    """``--data-dir``, else the package's shared data folder ($LIBORTHO_DATA or shared/data near the checkout)."""
    from ..data import DATA_DIR
    d = Path(given) if given else DATA_DIR
    if not (d / "reasoning").is_dir():
        raise SystemExit(f"{d} holds no reasoning/ folder; pass --data-dir (the folder with reasoning/ and text/)")
    return d


def resolve(args) -> dict:
    """Effective settings (quick/full defaults filled in)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    base = QUICK if args.quick else FULL
    pick = lambda key: getattr(args, key) if getattr(args, key) is not None else base[key]  # noqa: E731
    return {"device": device, "dtype": dtype, "tasks": list(args.tasks), "n_test": pick("n_test"),
            "shots": args.shots, "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size or (256 if device.startswith("cuda") else 32),
            "ppl_batch_size": 8 if device.startswith("cuda") else 1,
            "calib_samples": pick("calib_samples"), "calib_seq_len": pick("calib_seq_len"),
            "ppl_tokens": pick("ppl_tokens"), "ppl_seq_len": args.ppl_seq_len, "seed": args.seed,
            "alpha0": args.alpha0, "workers": max(1, args.workers or (4 if device.startswith("cuda") else 1)),
            "data_dir": str(find_data_dir(args.data_dir)),
            "conditions": args.conditions or (list(QUICK_CONDITIONS) if args.quick else
                                              [c.name for c in default_conditions()])}


def command_line(args, s: dict, conditions=None) -> str:
    import shlex
    parts = ["libortho", "experiment", "genius", "--model", args.model, "--device", s["device"],
             "--dtype", str(s["dtype"]).replace("torch.", ""), "--tasks", *s["tasks"]]
    if s["n_test"] is not None:
        parts += ["--n-test", str(s["n_test"])]
    parts += ["--shots", str(s["shots"]), "--max-new-tokens", str(s["max_new_tokens"]),
              "--batch-size", str(s["batch_size"]), "--conditions", *(conditions or s["conditions"]),
              "--alpha0", s["alpha0"], "--calib-samples", str(s["calib_samples"]),
              "--calib-seq-len", str(s["calib_seq_len"]), "--ppl-tokens", str(s["ppl_tokens"]),
              "--ppl-seq-len", str(s["ppl_seq_len"]), "--seed", str(s["seed"]), "--workers", str(s["workers"])]
    return shlex.join(parts)


def setup(model_name: str, s: dict, conds) -> dict:
    """The fp32 base model on the device, its tokenizer, the calibration sets and the ppl token ids."""
    import libortho

    from ..data import tokenize
    model, tok = libortho.load_model(model_name)
    cast_params(model, torch.float32)  # not .float(): refused by models transformers flags as quantized
    model = model.to(s["device"]).eval()
    data_dir = Path(s["data_dir"])
    needed = {c.calib for c in conds if c.config is not None and c.config.needs_calibration}
    calibs = make_calibrations(tok, needed, data_dir, s["tasks"], s["calib_samples"], s["calib_seq_len"], s["seed"])
    ppl_ids = tokenize(tok, libortho.read_text(data_dir / "text" / PPL_TEXT))[: s["ppl_tokens"]]
    meta = {"class": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
            "calibration": {k: c.description for k, c in calibs.items()}}
    return {"model": model, "tok": tok, "calibs": calibs, "ppl_ids": ppl_ids, "meta": meta}


def run_serial(model_name: str, s: dict, conds, progress: bool = True, log=print, on_done=None):
    st = setup(model_name, s, conds)
    rows = []
    for cond in conds:
        new = run_conditions(st["model"], st["tok"], [cond], s["tasks"], Path(s["data_dir"]) / "reasoning",
                             s["device"], s["dtype"], st["calibs"], st["ppl_ids"], s, s["alpha0"], progress, log)
        rows += new
        if on_done:
            on_done(cond.name, new, st["meta"])
    return rows, st["meta"]


class Partial:
    """Rows of finished conditions, one JSON line per condition, so a run cut off keeps what it measured
    and ``--resume`` runs only the rest. Lines carry the settings; a resume with other settings refuses."""

    def __init__(self, path: Path, s: dict):
        import json
        self.path = path
        self.key = json.dumps({k: str(v) for k, v in s.items() if k not in ("conditions", "workers")}, sort_keys=True)

    def load(self) -> dict:
        import json
        done = {}
        if not self.path.exists():
            return done
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if n == len(self.path.read_text().splitlines()):  # a last line cut off mid-write
                    break
                raise SystemExit(f"{self.path}:{n} is not a JSON line; delete the file to start over")
            if entry.get("settings") != self.key:
                raise SystemExit(f"{self.path} was written with other settings; delete it or drop --resume")
            done[entry["condition"]] = entry
        return done

    def add(self, name: str, rows: list[dict], meta: dict) -> None:
        import json
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"condition": name, "rows": rows, "meta": meta, "settings": self.key}) + "\n")
            f.flush()


def _group(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        out.setdefault(r["name"].split("@")[0], []).append(r)
    return out


def run(args) -> dict:
    from . import genius_report as report
    if args.list:
        for c in default_conditions(args.seed):
            cfg = c.config
            print(f"{c.name:26s} " + ("dense" if cfg is None else
                  f"bits={cfg.bits} group_size={cfg.group_size} method={cfg.method} density={cfg.density:g} "
                  f"score={cfg.score}" + (f" calib={c.calib}" if cfg.needs_calibration else "")))
        return {}
    s = resolve(args)
    conds = select_conditions(s["conditions"], s["seed"])
    s["conditions"] = [c.name for c in conds]
    s["fewshot_overlap"] = fewshot_overlap(s["tasks"], Path(s["data_dir"]) / "reasoning", s["n_test"])
    print(report.protocol_text(s))
    t0 = time.time()
    progress = not args.no_progress
    stem = args.name or ("genius-quick" if args.quick else "genius")
    partial = Partial(Path(args.out_dir) / f"{stem}.partial.jsonl", s)
    if not args.resume and partial.path.exists():
        partial.path.unlink()
    done = partial.load()
    todo = [c for c in conds if c.name not in done]
    if done:
        print(f"resuming: {len(done)} condition(s) from {partial.path}; to run: {[c.name for c in todo]}")
    rows, meta = [], next((e["meta"] for e in done.values()), None)
    if todo and s["workers"] > 1:
        from .genius_workers import run_parallel
        rows, meta = run_parallel(args.model, s, todo, s["workers"], progress, log=tqdm.write, on_done=partial.add)
    elif todo:
        rows, meta = run_serial(args.model, s, todo, progress, log=tqdm.write, on_done=partial.add)
    by_cond = {**{n: e["rows"] for n, e in done.items()}, **_group(rows)}
    rows = [r for c in conds for r in by_cond[c.name]]
    add_retention(rows)
    for r in rows:
        r["command"] = command_line(args, s, [r["name"].split("@")[0]])
    result = report.assemble(args, s, meta, rows, command_line(args, s), time.time() - t0)
    paths = report.write_results(result, Path(args.out_dir), stem)
    partial.path.unlink(missing_ok=True)  # the full result now holds every row
    print(report.markdown_table(result["conditions"], s["tasks"]))
    print("\n" + result["summary"])
    print(f"\nwrote {', '.join(str(p) for p in paths)} in {time.time() - t0:.0f} s")
    return result
