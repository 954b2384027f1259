"""Perplexity = exp(mean token NLL) over non-overlapping windows of a concatenated text (GPTQ protocol)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import tokenize, token_windows


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seq_len: int = 2048, max_tokens: int | None = None,
               batch_size: int = 1, progress: bool = True, ids: torch.Tensor | None = None) -> float:
    """``text`` is raw text (read files with libortho.read_text); ``ids`` skips tokenization."""
    ids = tokenize(tokenizer, text) if ids is None else ids
    if max_tokens is not None:
        ids = ids[:max_tokens]
    windows = token_windows(ids, seq_len)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", disable=not progress):
        batch = windows[i:i + batch_size].to(device)
        logits = model(batch, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               reduction="sum")
        nll += float(loss)
        count += batch[:, 1:].numel()
    return math.exp(nll / count)
