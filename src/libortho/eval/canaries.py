"""Canaries for the privacy experiment: generation, greedy extraction, exposure and a membership signal.

A canary is ``template`` with a person's name and a random secret of ``digits`` decimal digits, e.g.
"The account PIN of Alice Brown is 042917" (secret space |R| = 10**digits). Every canary has its own
prefix (distinct names), so extraction of one secret cannot be helped by another.

Exposure (Carlini et al., "The Secret Sharer", 2019): ``log2 |R| - log2 rank`` of the true secret among
all candidates of R, ranked by the log-likelihood the model gives to the secret's digits after the
prefix (higher first). Two estimators:

* ``exact_exposure``: every candidate scored. Each digit must be one token, so the candidates form a
  10-ary prefix tree: the prefix runs once (digit 1, and its keys/values), then ``d1..d(D-2)`` on that
  cache gives digits 2..D-1, and the last digit comes from one extra token per branch
  (per canary: 1 prefix + 10**(D-2) x (D-2) tokens + 10**(D-1) single tokens, instead of 10**D full
  sequences).
* ``sampled_exposure``: the skew-normal extrapolation of the paper (fit the log-perplexity of random
  candidates, exposure = -log2 of the fitted probability that a random candidate beats the secret).

All scoring is batched across canaries: canaries whose prefixes have the same token length are
stacked (no padding, so no position-id or mask subtleties).
"""
from __future__ import annotations

import copy
import inspect
import math
import random
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_TEMPLATE = "The account PIN of {name} is {secret}"

FIRST_NAMES = (
    "Alice", "Arthur", "Beatrice", "Benjamin", "Clara", "Daniel", "Edith", "Edward", "Eleanor", "Felix",
    "Florence", "George", "Grace", "Harold", "Helen", "Henry", "Irene", "Isaac", "Julia", "Kenneth",
    "Laura", "Leonard", "Lucy", "Martin", "Mabel", "Nathan", "Nora", "Oliver", "Olive", "Patrick",
    "Phoebe", "Quentin", "Rose", "Samuel", "Sophia", "Thomas", "Ursula", "Victor", "Violet", "Walter",
    "Winifred", "Xavier", "Yvonne", "Zachary", "Agnes", "Bernard", "Cecily", "Douglas",
)
SURNAMES = (
    "Abbott", "Barker", "Carver", "Dalton", "Ellison", "Fletcher", "Garner", "Hadley", "Ingram", "Jarvis",
    "Keller", "Lambert", "Mercer", "Norris", "Osborne", "Porter", "Quinlan", "Radford", "Sawyer", "Thorne",
    "Upton", "Vance", "Whitaker", "Yardley", "Ashby", "Bramwell", "Crosby", "Draper", "Emerson", "Fenwick",
    "Gilbert", "Holloway", "Irving", "Jennings", "Kendall", "Lockwood", "Marlowe", "Nugent", "Oakley",
    "Pemberton", "Rowland", "Sheldon", "Tennant", "Underhill", "Wakefield", "Winslow", "Xander", "Young",
)


@dataclass(frozen=True)
class Canary:
    name: str
    prefix: str   # the template up to the secret, e.g. "The account PIN of Alice Brown is "
    secret: str   # ``digits`` decimal digits

    @property
    def text(self) -> str:
        return self.prefix + self.secret


def make_canaries(n: int, digits: int = 6, seed: int = 0, template: str = DEFAULT_TEMPLATE,
                  ) -> tuple[list[Canary], list[Canary]]:
    """``n`` member canaries (to be inserted in training) and ``n`` non-members of the same template.

    All 2n prefixes are distinct (distinct names); secrets are uniform over 10**digits. Seeded.
    """
    if n < 1 or digits < 1:
        raise ValueError(f"need n >= 1 and digits >= 1, got n={n}, digits={digits}")
    if not template.endswith("{secret}") or template.count("{secret}") != 1 or "{name}" not in template:
        raise ValueError(f"template {template!r} must contain {{name}} and end with {{secret}}")
    names = [f"{f} {s}" for f in FIRST_NAMES for s in SURNAMES]
    if 2 * n > len(names):
        raise ValueError(f"at most {len(names) // 2} canaries (distinct names) are available, asked for {n}")
    rng = random.Random(seed)
    chosen = rng.sample(names, 2 * n)
    head = template[: -len("{secret}")]
    canaries = [Canary(name, head.format(name=name), f"{rng.randrange(10 ** digits):0{digits}d}")
                for name in chosen]
    return canaries[:n], canaries[n:]


# -- tokenization -------------------------------------------------------------------------------------

def digit_token_ids(tokenizer) -> torch.Tensor:
    """Token id of each digit 0..9; exact enumeration needs every digit to be exactly one token."""
    ids = []
    for d in range(10):
        t = tokenizer(str(d), add_special_tokens=False)["input_ids"]
        if len(t) != 1:
            raise ValueError(f"the tokenizer splits the digit {d} into {len(t)} tokens {t}; the canary "
                             "scoring needs one token per digit")
        ids.append(t[0])
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class EncodedCanaries:
    """Token ids of canaries: one prefix per canary, the secret as digit values (n, D)."""
    prefixes: list[torch.Tensor]
    secrets: torch.Tensor
    digit_ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.prefixes)

    def token_ids(self, i: int) -> torch.Tensor:
        """The whole canary (prefix + secret tokens), as used in training."""
        return torch.cat([self.prefixes[i], self.digit_ids[self.secrets[i]]])


def encode_canaries(tokenizer, canaries: list[Canary]) -> EncodedCanaries:
    """Tokenize; checks that the canary's tokens are exactly prefix tokens + one token per digit."""
    digit_ids = digit_token_ids(tokenizer)
    prefixes, secrets = [], []
    for c in canaries:
        p = tokenizer(c.prefix, add_special_tokens=False)["input_ids"]
        full = tokenizer(c.text, add_special_tokens=False)["input_ids"]
        digits = [int(ch) for ch in c.secret]
        if full != p + digit_ids[digits].tolist():
            raise ValueError(f"canary {c.text!r} does not tokenize as its prefix followed by one token per "
                             f"digit ({full} vs {p} + digits): choose a template whose prefix ends where a "
                             "token ends (e.g. with a space)")
        prefixes.append(torch.tensor(p, dtype=torch.long))
        secrets.append(digits)
    return EncodedCanaries(prefixes, torch.tensor(secrets, dtype=torch.long), digit_ids)


def length_groups(prefixes: list[torch.Tensor]) -> list[list[int]]:
    """Indices of canaries grouped by prefix length (stacked without padding)."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prefixes):
        groups.setdefault(p.numel(), []).append(i)
    return [groups[k] for k in sorted(groups)]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _cache_kwarg(model, cache) -> dict:
    """transformers >= 5.2x renames ``past_key_values`` to ``cache``; pass whichever forward takes."""
    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def _cache_of(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def _select_rows(cache, idx: torch.Tensor):
    """A new cache holding rows ``idx`` (repeats allowed) of ``cache``, which is left untouched."""
    new = copy.deepcopy(cache)  # forward appends to its cache in place: never hand it the shared one
    if hasattr(new, "batch_select_indices"):
        new.batch_select_indices(idx)
    else:  # older caches
        new.reorder_cache(idx)
    return new


def _repeat_rows(cache, times: int, rows: int) -> None:
    """Repeat every batch row of a key/value cache ``times`` times in place (row r -> rows r*times..)."""
    if hasattr(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(times)
    else:  # older caches: the beam-search reorder does the same with repeated indices
        cache.reorder_cache(torch.arange(rows).repeat_interleave(times))


def _digit_logprobs(logits: torch.Tensor, digit_ids: torch.Tensor) -> torch.Tensor:
    """log p(digit) under the full-vocabulary softmax (fp32): (..., V) -> (..., 10)."""
    logits = logits.float()
    return logits[..., digit_ids] - torch.logsumexp(logits, dim=-1, keepdim=True)


# -- greedy extraction ------------------------------------------------------------------------------

@torch.no_grad()
def greedy_extraction(model, enc: EncodedCanaries, batch_size: int = 256) -> torch.Tensor:
    """(n,) bool: greedy decoding (full vocabulary) after the prefix reproduces all D secret digits."""
    device, D = _device(model), enc.secrets.shape[1]
    hit = torch.zeros(len(enc), dtype=torch.bool)
    for group in length_groups(enc.prefixes):
        for s in range(0, len(group), batch_size):
            idx = group[s:s + batch_size]
            x = torch.stack([enc.prefixes[i] for i in idx]).to(device)
            p = x.shape[1]
            for _ in range(D):  # D short forward passes: cheap, and no cache subtleties
                nxt = model(input_ids=x, use_cache=False, logits_to_keep=1).logits[:, -1].argmax(-1)
                x = torch.cat([x, nxt[:, None]], dim=1)
            target = enc.digit_ids[enc.secrets[idx]].to(device)
            hit[idx] = (x[:, p:] == target).all(dim=1).cpu()
    return hit


# -- teacher-forced log-likelihood ------------------------------------------------------------------

@torch.no_grad()
def digits_loglik(model, enc: EncodedCanaries, owner: torch.Tensor, digits: torch.Tensor,
                  batch_size: int = 1024) -> torch.Tensor:
    """Log-likelihood of ``digits[r]`` (D digit values) after the prefix of canary ``owner[r]``: (r,).

    Sum of the D per-digit log-probabilities (full-vocabulary softmax): the prefix's own likelihood is
    the same for every candidate of a canary, so this orders candidates as the sequence likelihood does.
    """
    device, D = _device(model), digits.shape[1]
    out = torch.empty(owner.numel(), dtype=torch.float32)
    plen = torch.tensor([p.numel() for p in enc.prefixes])
    for group in length_groups(enc.prefixes):
        length = enc.prefixes[group[0]].numel()
        pref = torch.zeros(len(enc), length, dtype=torch.long)
        pref[group] = torch.stack([enc.prefixes[i] for i in group])
        rows = torch.nonzero(plen[owner] == length).flatten()
        for s in range(0, rows.numel(), batch_size):
            r = rows[s:s + batch_size]
            ids = torch.cat([pref[owner[r]], enc.digit_ids[digits[r]]], dim=1).to(device)
            # positions length-1 .. length+D-2 predict the D digits
            lp = _digit_logprobs(model(input_ids=ids, use_cache=False, logits_to_keep=D + 1).logits[:, :-1],
                                 enc.digit_ids.to(device))
            out[r] = lp.gather(-1, digits[r].to(device)[..., None]).squeeze(-1).sum(-1).cpu()
    return out


def secret_loglik(model, enc: EncodedCanaries, batch_size: int = 1024) -> torch.Tensor:
    """(n,) log-likelihood of each canary's own secret given its prefix."""
    return digits_loglik(model, enc, torch.arange(len(enc)), enc.secrets, batch_size)


# -- exposure ---------------------------------------------------------------------------------------

def all_digit_strings(digits: int) -> torch.Tensor:
    """(10**digits, digits) digit values of 0 .. 10**digits - 1, most significant first."""
    if digits == 0:
        return torch.zeros(1, 0, dtype=torch.long)
    n = torch.arange(10 ** digits)
    powers = 10 ** torch.arange(digits - 1, -1, -1)
    return (n[:, None] // powers) % 10


def secret_index(secrets: torch.Tensor) -> torch.Tensor:
    """(n, D) digit values -> (n,) the integer they spell."""
    D = secrets.shape[1]
    return (secrets * 10 ** torch.arange(D - 1, -1, -1)).sum(1)


def rank_of(ll_all: torch.Tensor, ll_secret: torch.Tensor) -> torch.Tensor:
    """Rank (1 = most likely) of the secret among all candidates, ties at their mid-rank: (n,) float64."""
    greater = (ll_all > ll_secret[:, None]).sum(1).double()
    ties = (ll_all == ll_secret[:, None]).sum(1).double() - 1  # the secret itself is one of the equal ones
    return 1 + greater + ties.clamp_min(0) / 2


def exposure_from_rank(rank: torch.Tensor, space: int) -> torch.Tensor:
    return math.log2(space) - torch.log2(rank.double())


@torch.no_grad()
def all_candidates_loglik(model, enc: EncodedCanaries, batch_size: int = 1024) -> torch.Tensor:
    """(n, 10**D) log-likelihood of every candidate secret of every canary (exact enumeration).

    The prefixes of a length group run once (log-probs of digit 1, and the keys/values). Each row
    (canary, context c of D-2 digits) then feeds only c on a copy of its canary's prefix cache (digits
    2..D-1); stage B repeats each row's cache 10 times and feeds digit D-1 as one token, giving digit D.
    Candidate ``c * 100 + x * 10 + y`` sums the log-probs along its own path. Rows of all canaries with
    the same prefix length share the batches (``batch_size`` rows each).
    """
    D = enc.secrets.shape[1]
    if D < 2:
        raise ValueError("exact enumeration needs at least 2 digits")
    device, a = _device(model), D - 2
    ctx = all_digit_strings(a)                      # (C, a)
    n_ctx = ctx.shape[0]
    dig = enc.digit_ids.to(device)
    ll_all = torch.empty(len(enc), 10 ** D, dtype=torch.float32)
    for group in length_groups(enc.prefixes):
        pref = torch.stack([enc.prefixes[i] for i in group]).to(device)
        out = model(input_ids=pref, use_cache=True, logits_to_keep=1)
        lp_1 = _digit_logprobs(out.logits[:, -1], dig)                          # (g, 10): digit 1
        prefix_cache = _cache_of(out)
        del out
        owner = torch.arange(len(group)).repeat_interleave(n_ctx)     # rows: (canary, context)
        context = torch.arange(n_ctx).repeat(len(group))
        block = torch.empty(len(group) * n_ctx, 100)
        for s in range(0, owner.numel(), batch_size):
            o, c = owner[s:s + batch_size].to(device), context[s:s + batch_size]
            b = o.numel()
            cache = _select_rows(prefix_cache, o)
            lp = lp_1[o, None]                                                   # (b, 1, 10)
            if a:  # positions continue after the prefix: HF takes them from the cache length
                out = model(input_ids=enc.digit_ids[ctx[c]].to(device), use_cache=True, logits_to_keep=a,
                            **_cache_kwarg(model, cache))
                lp = torch.cat([lp, _digit_logprobs(out.logits, dig)], dim=1)   # (b, a+1, 10)
                cache = _cache_of(out)
                del out
            path = lp[:, :a].gather(-1, ctx[c].to(device)[..., None]).squeeze(-1).sum(-1)  # (b,)
            _repeat_rows(cache, 10, b)
            nxt = dig.repeat(b)[:, None]                                          # (b*10, 1)
            lp_b = _digit_logprobs(model(input_ids=nxt, use_cache=True, logits_to_keep=1,
                                         **_cache_kwarg(model, cache)).logits[:, -1], dig)  # (b*10, 10)
            ll = path[:, None, None] + lp[:, a, :, None] + lp_b.view(-1, 10, 10)
            block[s:s + b] = ll.reshape(-1, 100).cpu()
            del cache
        del prefix_cache
        ll_all[group] = block.view(len(group), n_ctx * 100)
    return ll_all


def exact_exposure(model, enc: EncodedCanaries, batch_size: int = 1024) -> dict:
    """Exposure of every canary by exact enumeration of all 10**D candidates."""
    D = enc.secrets.shape[1]
    ll_all = all_candidates_loglik(model, enc, batch_size)
    ll_secret = ll_all.gather(1, secret_index(enc.secrets)[:, None]).squeeze(1)
    rank = rank_of(ll_all, ll_secret)
    return {"exposure": exposure_from_rank(rank, 10 ** D).tolist(), "rank": rank.tolist(),
            "ll_secret": ll_secret.tolist(), "method": "exact"}


def sampled_exposure(model, enc: EncodedCanaries, n_samples: int = 4096, seed: int = 0,
                     batch_size: int = 1024) -> dict:
    """Exposure from ``n_samples`` random candidates per canary (skew-normal extrapolation).

    Also returns the plain sampled estimate (rank = 1 + |R| * fraction of samples that beat the
    secret), which saturates at log2 |R| when no sample beats it.
    """
    from scipy import stats

    n, D = enc.secrets.shape
    space = 10 ** D
    gen = torch.Generator().manual_seed(seed)
    sec = secret_index(enc.secrets)
    cand = torch.randint(0, space, (n, n_samples), generator=gen)
    clash = cand == sec[:, None]
    while clash.any():  # candidates are drawn from R without the secret
        cand[clash] = torch.randint(0, space, (int(clash.sum()),), generator=gen)
        clash = cand == sec[:, None]
    digits = all_digit_strings(D) if space <= 10 ** 6 else None
    cand_digits = digits[cand.flatten()] if digits is not None else \
        (cand.flatten()[:, None] // 10 ** torch.arange(D - 1, -1, -1)) % 10
    owner = torch.arange(n).repeat_interleave(n_samples)
    ll_c = digits_loglik(model, enc, owner, cand_digits, batch_size).view(n, n_samples)
    ll_s = secret_loglik(model, enc, batch_size)
    exposure, plain = [], []
    for i in range(n):
        a, loc, scale = stats.skewnorm.fit(-ll_c[i].double().numpy())  # log-perplexity of candidates
        p = stats.skewnorm.cdf(-float(ll_s[i]), a, loc, scale)          # P(candidate beats the secret)
        exposure.append(float(min(math.log2(space), max(0.0, -math.log2(max(p, 1e-300))))))
        beat = float((ll_c[i] > ll_s[i]).sum()) + float((ll_c[i] == ll_s[i]).sum()) / 2
        plain.append(math.log2(space) - math.log2(1 + (space - 1) * beat / n_samples))
    return {"exposure": exposure, "exposure_sampled_plain": plain, "ll_secret": ll_s.tolist(),
            "method": f"skew-normal ({n_samples} samples)"}


# -- membership signal and statistics --------------------------------------------------------------

def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties at their average rank."""
    x = np.asarray(x, dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    start = np.cumsum(counts) - counts
    return (start + (counts + 1) / 2.0)[inverse]


def auc(pos, neg) -> float:
    """P(score of a positive > score of a negative) + P(tie) / 2, by the rank-sum (Mann-Whitney) formula."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("AUC needs at least one positive and one negative")
    r = midranks(np.concatenate([pos, neg]))
    return float((r[:pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap CI of the mean of ``values`` (resampling the items)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (n_boot, v.size))].mean(1)
    q = (1 - level) / 2
    return [float(np.quantile(means, q)), float(np.quantile(means, 1 - q))]


def bootstrap_auc_ci(pos_by_seed, neg_by_seed, n_boot: int = 1000, seed: int = 0,
                     level: float = 0.95) -> list[float]:
    """CI of the seed-averaged AUC, resampling members and non-members within each seed."""
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    pos_by_seed = [np.asarray(p, dtype=np.float64) for p in pos_by_seed]
    neg_by_seed = [np.asarray(n, dtype=np.float64) for n in neg_by_seed]
    for b in range(n_boot):
        stats[b] = np.mean([auc(p[rng.integers(0, p.size, p.size)], n[rng.integers(0, n.size, n.size)])
                            for p, n in zip(pos_by_seed, neg_by_seed)])
    q = (1 - level) / 2
    return [float(np.quantile(stats, q)), float(np.quantile(stats, 1 - q))]
