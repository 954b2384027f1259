"""Several processes sharing one device for ``libortho experiment genius --workers N``.

The GPTQ sweep issues many tiny kernels from Python, so one process leaves the GPU mostly idle; N
processes (spawned, each holding its own fp32 copy of the model, calibration sets and ppl ids) take
whole conditions from a queue, the most expensive first. Results are the same rows as the serial run.
With ``--device cuda`` on a machine of several GPUs, worker i runs on GPU i mod (number of GPUs).
"""
from __future__ import annotations

import os

import torch
from tqdm.auto import tqdm

_STATE: dict = {}


def _init(model_name: str, s: dict, cond_names: list[str], threads: int, n_gpus: int) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)
    if n_gpus > 1:
        import multiprocessing
        index = multiprocessing.current_process()._identity[0] - 1  # pool workers count from 1
        s = {**s, "device": f"cuda:{index % n_gpus}"}
        torch.cuda.set_device(s["device"])
    try:
        from transformers.utils import logging
        logging.disable_progress_bar()
    except ImportError:  # older transformers: bars stay on, nothing else changes
        logging = None
    from .genius import select_conditions, setup
    conds = {c.name: c for c in select_conditions(cond_names, s["seed"])}
    _STATE.update(setup(model_name, s, list(conds.values())), conds=conds, s=s)


def _work(name: str):
    from pathlib import Path

    from .genius import run_conditions
    st, s = _STATE, _STATE["s"]
    rows = run_conditions(st["model"], st["tok"], [st["conds"][name]], s["tasks"], Path(s["data_dir"]) / "reasoning",
                          s["device"], s["dtype"], st["calibs"], st["ppl_ids"], s, s["alpha0"], progress=False,
                          log=lambda *a: None)
    return name, rows, st["meta"]


def _cost(c) -> tuple:
    cfg = c.config
    return (cfg is not None and cfg.method == "gptq", cfg is not None and cfg.has_ortho, c.alpha0)


def warm_caches(model_name: str, device: str) -> None:
    """Convert SmolLM2 and build the CUDA extension once here, so that the workers do neither at once."""
    from ..data import SMOLLM2_ALIASES, cache_dir
    if model_name.lower() in SMOLLM2_ALIASES and not (cache_dir() / "smollm2-135m-instruct" / "config.json").exists():
        import libortho
        libortho.load_model(model_name)
    if device.startswith("cuda"):
        from ..ops import cuda
        cuda.available()


def run_parallel(model_name: str, s: dict, conds, workers: int, progress: bool = True, log=print, on_done=None):
    from .genius_report import _one_line
    warm_caches(model_name, s["device"])
    order = sorted(conds, key=_cost, reverse=True)
    threads = max(1, len(os.sched_getaffinity(0)) // workers) if hasattr(os, "sched_getaffinity") \
        else max(1, (os.cpu_count() or workers) // workers)  # the cores this process may use (taskset)
    n_gpus = torch.cuda.device_count() if s["device"] == "cuda" else 0
    ctx = torch.multiprocessing.get_context("spawn")
    done, meta = {}, None
    with ctx.Pool(min(workers, len(conds)), initializer=_init,
                  initargs=(model_name, s, [c.name for c in conds], threads, n_gpus)) as pool:
        for name, rows, m in tqdm(pool.imap_unordered(_work, [c.name for c in order]), total=len(order),
                                     desc=f"conditions ({workers} workers)", disable=not progress):
            done[name], meta = rows, m
            if on_done:
                on_done(name, rows, m)
            for r in rows:
                log(_one_line(r))
    return [r for c in conds for r in done[c.name]], meta
