"""Several processes evaluating the conditions of one privacy seed side by side (``--workers N``).

The fine-tune runs once, in the parent; its weights go to a temporary safetensors file that every
worker (spawned) loads into its own copy of the model, next to the reference model, the canaries and
the calibration sets, all rebuilt deterministically from the seed. The GPTQ sweeps are launch-bound,
so N processes keep one GPU busy; on several GPUs worker i uses GPU i mod their number. Rows are the
same as the serial run's.
"""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

_STATE: dict = {}


def _device(s: dict, n_gpus: int) -> str:
    if n_gpus > 1:
        import multiprocessing
        index = multiprocessing.current_process()._identity[0] - 1  # pool workers count from 1
        torch.cuda.set_device(index % n_gpus)
        return f"cuda:{index % n_gpus}"
    return s["device"]


def _init(s: dict, seed: int, cond_names: list[str], weights: str, threads: int, n_gpus: int) -> None:
    import safetensors.torch

    import libortho

    from .canaries import encode_canaries, make_canaries
    from .privacy import condition_list, load_texts, make_calibrations
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)
    device = _device(s, n_gpus)
    model0, tok = libortho.load_model(s["model"])
    from .privacy import _cast_params
    model0 = _cast_params(model0, torch.float32).eval()
    texts = load_texts(tok, s)
    members_c, nonmembers_c = make_canaries(s["n_canaries"], s["digits"], seed, s["template"])
    members, nonmembers = encode_canaries(tok, members_c), encode_canaries(tok, nonmembers_c)
    conds = {c.name: c for c in condition_list(s["bits"], s["group_size"], s["density"], s["method"], seed)
             if c.name in cond_names}
    finetuned = copy.deepcopy(model0)
    safetensors.torch.load_model(finetuned, weights, strict=True)
    _STATE.update(s=s, seed=seed, tok=tok, texts=texts, members=members, nonmembers=nonmembers, conds=conds,
                  reference=model0.to(device), finetuned=finetuned.to(device).eval(),
                  calibs=make_calibrations(tok, texts, s, seed, members, list(conds.values())))


def _work(name: str):
    from .privacy import eval_condition
    st = _STATE
    row = eval_condition(st["conds"][name], st["finetuned"], st["reference"], st["calibs"], st["tok"],
                         st["members"], st["nonmembers"], st["texts"], st["s"], st["seed"])
    return name, row


def _cost(c) -> tuple:
    cfg = c.config
    return (cfg is not None and cfg.method == "gptq", cfg is not None and cfg.has_ortho)


def run_parallel(finetuned, conds, s: dict, seed: int, on_done=None) -> dict:
    """{condition name: row} for ``conds``, evaluated by ``s["workers"]`` processes."""
    import safetensors.torch
    workers = min(s["workers"], len(conds))
    n_gpus = torch.cuda.device_count() if s["device"] == "cuda" else 0
    threads = max(1, len(os.sched_getaffinity(0)) // workers) if hasattr(os, "sched_getaffinity") \
        else max(1, (os.cpu_count() or workers) // workers)  # the cores this process may use (taskset)
    order = sorted(conds, key=_cost, reverse=True)
    ctx = torch.multiprocessing.get_context("spawn")
    results = {}
    with tempfile.TemporaryDirectory(prefix="libortho-privacy-") as tmp:
        weights = str(Path(tmp) / "finetuned.safetensors")
        safetensors.torch.save_model(finetuned, weights)  # handles the tied embedding
        with ctx.Pool(workers, initializer=_init,
                      initargs=(s, seed, [c.name for c in conds], weights, threads, n_gpus)) as pool:
            for name, row in tqdm(pool.imap_unordered(_work, [c.name for c in order]), total=len(order),
                                  desc=f"conditions (seed {seed}, {workers} workers)", disable=not s["progress"]):
                results[name] = row
                if on_done:
                    on_done(name, row)
    return results
