"""The memorizing fine-tune of the privacy experiment: public text windows with canaries mixed in.

Each canary occurrence starts a training window (canary tokens, a newline, then public text), so the
model sees the canary's prefix at position 0, exactly where extraction and exposure prompt it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..data import token_windows
from ..errors import LibOrthoError


def split_heldout(text: str, frac: float = 0.1) -> tuple[str, str]:
    """(first part, last ``frac`` of the text), cut at the line break after the cut point."""
    if not 0 < frac < 1:
        raise ValueError(f"held-out fraction must be in (0, 1), got {frac}")
    cut = int(len(text) * (1 - frac))
    nl = text.find("\n", cut)
    cut = nl + 1 if nl != -1 else cut
    return text[:cut], text[cut:]


@dataclass
class TrainingSet:
    windows: torch.Tensor                 # (W, seq_len) token ids
    canary_of: list[list[int]]            # canaries starting each window (empty for plain public text)
    description: str = ""


def build_training_set(public_ids: torch.Tensor, canary_ids: list[torch.Tensor], sep_ids: list[int],
                       seq_len: int, n_windows: int, reps: int, seed: int) -> TrainingSet:
    """``n_windows`` public windows (0 = all), ``reps`` occurrences of every canary at window starts.

    Occurrences go to distinct windows drawn with ``seed``; the window keeps its public text after
    the canary and the separator (truncated to ``seq_len``).
    """
    windows = token_windows(public_ids, seq_len)
    if n_windows:
        if n_windows > windows.shape[0]:
            raise LibOrthoError(f"--ft-windows {n_windows} asks for more windows of {seq_len} tokens than the "
                                f"fine-tuning text holds ({windows.shape[0]})")
        gen = torch.Generator().manual_seed(seed)
        windows = windows[torch.sort(torch.randperm(windows.shape[0], generator=gen)[:n_windows]).values]
    windows = windows.clone()
    n_occ = len(canary_ids) * reps
    if n_occ > windows.shape[0]:
        raise LibOrthoError(f"{len(canary_ids)} canaries x {reps} repetitions = {n_occ} occurrences need as many "
                            f"windows; the fine-tuning set has {windows.shape[0]}: raise --ft-windows")
    gen = torch.Generator().manual_seed(seed + 1)
    slots = torch.randperm(windows.shape[0], generator=gen)[:n_occ].tolist()
    canary_of: list[list[int]] = [[] for _ in range(windows.shape[0])]
    sep = torch.tensor(sep_ids, dtype=torch.long)
    for k, w in enumerate(slots):
        c = k % len(canary_ids)
        head = torch.cat([canary_ids[c], sep])
        if head.numel() >= seq_len:
            raise LibOrthoError(f"a canary ({head.numel()} tokens) does not fit a window of {seq_len}")
        windows[w, :head.numel()] = head
        canary_of[w].append(c)
    desc = (f"{windows.shape[0]} windows x {seq_len} tokens of public text; {len(canary_ids)} canaries x {reps} "
            f"occurrences, each at the start of its own window")
    return TrainingSet(windows, canary_of, desc)


@dataclass
class FinetuneLog:
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    extraction_curve: list[tuple[int, float]] = field(default_factory=list)
    presentations: list[int] = field(default_factory=list)   # times each canary was trained on
    seconds: float = 0.0


def finetune(model, data: TrainingSet, n_canaries: int, steps: int, batch_size: int, lr: float,
             seed: int, amp_dtype: torch.dtype | None = None, warmup: int = 10, check=None,
             check_every: int = 0, max_steps: int = 0, target: float | None = None,
             progress: bool = True) -> FinetuneLog:
    """Full fine-tune (AdamW, constant lr after a linear warm-up, grad-norm clip 1) in place.

    Batches walk through seeded shuffles of the windows (one shuffle per epoch). ``amp_dtype``: autocast
    dtype on the GPU (bf16), None for plain fp32. ``check()`` -> extraction rate, logged every
    ``check_every`` steps and at the end. With ``target`` and ``max_steps > steps``, training goes on
    past ``steps`` (checking every ``check_every`` steps) until the rate reaches ``target`` or
    ``max_steps`` is done; the steps actually run are logged.
    """
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 2)
    log = FinetuneLog(presentations=[0] * n_canaries)
    order: list[int] = []
    extend = check is not None and target is not None and max_steps > steps
    total = max_steps if extend else steps
    every = check_every or (max(1, steps // 4) if extend else 0)
    warmup = max(1, min(warmup, steps // 10 or 1))
    t0 = time.time()
    model.train()
    bar = tqdm(range(total), desc="fine-tune", disable=not progress)
    done = 0
    for step in bar:
        while len(order) < batch_size:
            order += torch.randperm(data.windows.shape[0], generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        for w in idx:
            for c in data.canary_of[w]:
                log.presentations[c] += 1
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup)
        x = data.windows[idx].to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        value = float(loss.detach())
        if not math.isfinite(value):
            raise LibOrthoError(f"fine-tuning loss became {value} at step {step}: lower --ft-lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.losses.append(value)
        bar.set_postfix(loss=f"{value:.3f}")
        done = step + 1
        if check is not None and ((every and done % every == 0) or done in (steps, total)):
            model.eval()
            rate = float(check())
            model.train()
            log.extraction_curve.append((done, rate))
            if done >= steps and (not extend or rate >= target):
                break
    model.eval()
    log.steps = done
    log.seconds = time.time() - t0
    del opt
    return log
