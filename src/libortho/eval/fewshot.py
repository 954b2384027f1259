"""Few-shot greedy evaluation on the arithmetic tasks: prompts, batched generation, scoring.

Protocol (what :func:`evaluate_task` does):

* prompt: ``k`` worked examples from ``<task>.fewshot.jsonl`` as ``"Question: ...\\nAnswer: ...\\n\\n"``,
  then ``"Question: <q>\\nAnswer:"``, no chat template. A shot whose question equals the test
  question is skipped (the next few-shot row takes its place), so the answer is never in the prompt.
* greedy decoding, at most ``max_new_tokens`` new tokens, batched with left padding; a row stops at
  its first token containing a newline (or EOS). The answer is the decoded text up to the first
  newline, and its *first integer* (:func:`extract_answer`) is compared with the gold answer exactly.
* greedy decoding is deterministic per prompt, so each distinct question is generated once and its
  prediction reused for repeated test items (add1 and mul1 have fewer distinct questions than items).
"""
from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

TASKS = ("add1", "add2", "mul1", "sub2")

# An integer: optional minus directly before the digits, digits either plain or in exact groups of
# three after commas ("12,345" -> 12345; "1,2" -> 1), then an optional decimal part. A number with a
# non-zero decimal part ("7.5") is not an integer answer: extraction gives None for it.
_NUMBER = re.compile(r"(?<![\d.])(-?)(\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.(\d+))?")


def extract_answer(text: str | None) -> int | None:
    """The first integer in ``text`` (sign included), or None.

    "-12 apples" -> -12; "The answer is 7. Next question" -> 7; "12,345" -> 12345; "7.0" -> 7;
    "7.5" -> None (the first number is not an integer); "- 3" -> 3 (a minus counts only directly
    before the digits); "no number" -> None.
    """
    if not text:
        return None
    m = _NUMBER.search(text)
    if m is None:
        return None
    sign, digits, frac = m.groups()
    if frac is not None and frac.strip("0"):
        return None
    value = int(digits.replace(",", ""))
    return -value if sign else value


def answer_text(generated: str) -> str:
    """The model's answer: its generated text up to the first newline."""
    return generated.split("\n", 1)[0]


def load_rows(path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def load_task(task: str, data_dir) -> tuple[list[dict], list[dict]]:
    """(few-shot rows, test rows) of ``task`` from ``data_dir`` (the ``reasoning/`` folder or its parent)."""
    d = Path(data_dir)
    if not (d / f"{task}.test.jsonl").exists() and (d / "reasoning").is_dir():
        d = d / "reasoning"
    return load_rows(d / f"{task}.fewshot.jsonl"), load_rows(d / f"{task}.test.jsonl")


def format_shot(row: dict) -> str:
    return f"Question: {row['question']}\nAnswer: {row['answer']}\n\n"


def build_prompt(fewshot_rows, question: str, k: int = 5) -> str:
    """``k`` worked examples (skipping any whose question is ``question``), then the open question."""
    shots = [r for r in fewshot_rows if r["question"] != question][:k]
    if len(shots) < k:
        raise ValueError(f"asked for {k} shots, only {len(shots)} few-shot rows differ from the question")
    return "".join(format_shot(r) for r in shots) + f"Question: {question}\nAnswer:"


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % for z = 1.96); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    if not 0 <= correct <= n:
        raise ValueError(f"correct={correct} must lie in [0, n={n}]")
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def score(preds, answers) -> dict:
    """Exact-match accuracy of predictions (ints, None, or raw generated strings) against gold answers.

    Returns ``{accuracy, ci_low, ci_high, n, correct}`` (Wilson 95 % interval).
    """
    preds, answers = list(preds), list(answers)
    if len(preds) != len(answers):
        raise ValueError(f"{len(preds)} predictions for {len(answers)} answers")
    correct = 0
    for p, a in zip(preds, answers):
        p = extract_answer(answer_text(p)) if isinstance(p, str) else p
        a = a if isinstance(a, int) else extract_answer(str(a))
        correct += int(p is not None and p == a)
    n = len(answers)
    lo, hi = wilson_interval(correct, n)
    return {"accuracy": correct / n if n else 0.0, "ci_low": lo, "ci_high": hi, "n": n, "correct": correct}


# -- generation ---------------------------------------------------------------------------------------

_NEWLINE_MASKS: dict = {}


def newline_token_mask(tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """Bool (vocab,) marking the tokens whose text contains a newline (cached per tokenizer)."""
    key = (id(tokenizer), len(tokenizer), vocab_size)
    if key not in _NEWLINE_MASKS:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        size = max(len(tokenizer), vocab_size or 0)
        mask = torch.zeros(size, dtype=torch.bool)
        mask[: len(texts)] = torch.tensor(["\n" in t for t in texts], dtype=torch.bool)
        _NEWLINE_MASKS[key] = mask
    return _NEWLINE_MASKS[key]


def _stopping(mask: torch.Tensor):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAtNewline(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            m = mask.to(input_ids.device)
            return m[input_ids[:, -1].clamp(0, m.numel() - 1)]

    return StoppingCriteriaList([StopAtNewline()])


def _vocab_size(model) -> int | None:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return emb.weight.shape[0] if emb is not None else None


@torch.no_grad()
def generate_answers(model, tokenizer, prompts, batch_size: int = 64, max_new_tokens: int = 8,
                     progress: bool = True, desc: str = "generate") -> list[str]:
    """Greedy continuations of ``prompts`` (batched, left-padded), each cut at its first newline."""
    from transformers import GenerationConfig
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    saved_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    stop = _stopping(newline_token_mask(tokenizer, _vocab_size(model)))
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.bos_token_id)
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])  # similar lengths share a batch
    out: list[str | None] = [None] * len(prompts)
    try:
        for s in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=not progress):
            idx = order[s:s + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
            seq = model.generate(**enc, generation_config=gen_cfg, stopping_criteria=stop)
            texts = tokenizer.batch_decode(seq[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, t in zip(idx, texts):
                out[i] = answer_text(t)
    finally:
        tokenizer.padding_side = saved_side
    return out


def evaluate_task(model, tokenizer, task: str, data_dir, n_test: int | None = None, batch_size: int = 64,
                  max_new_tokens: int = 8, k: int = 5, progress: bool = True, return_outputs: bool = False) -> dict:
    """Few-shot greedy accuracy of ``model`` on ``task`` (first ``n_test`` test items; all when None).

    Returns :func:`score`'s dict plus ``n_distinct`` (distinct questions generated) and, with
    ``return_outputs``, ``outputs`` (question, gold, generated answer text, extracted prediction).
    """
    fewshot, test = load_task(task, data_dir)
    test = test[:n_test] if n_test is not None else test
    questions = list(dict.fromkeys(r["question"] for r in test))
    prompts = [build_prompt(fewshot, q, k) for q in questions]
    texts = generate_answers(model, tokenizer, prompts, batch_size, max_new_tokens, progress, desc=task)
    by_q = dict(zip(questions, texts))
    generated = [by_q[r["question"]] for r in test]
    result = score(generated, [r["answer"] for r in test])
    result["n_distinct"] = len(questions)
    if return_outputs:
        result["outputs"] = [{"question": r["question"], "answer": r["answer"], "text": t,
                              "pred": extract_answer(t)} for r, t in zip(test, generated)]
    return result


# -- the few-shot files as calibration text ------------------------------------------------------------

def task_calibration_text(tokenizer, tasks, data_dir, n_tokens: int, seed: int = 0) -> str:
    """The tasks' few-shot question/answer pairs in the prompt format, reshuffled (seeded) and repeated
    until the text holds at least ``n_tokens`` tokens (the same token budget as public calibration)."""
    shots = [format_shot(r) for t in tasks for r in load_task(t, data_dir)[0]]
    per_pass = max(1, len(tokenizer("".join(shots), add_special_tokens=False)["input_ids"]))
    rng = random.Random(seed)
    parts = []
    for _ in range(n_tokens // per_pass + 2):
        rng.shuffle(shots)
        parts.append("".join(shots))
    return "".join(parts)


def fewshot_overlap(tasks, data_dir, n_test=None) -> dict:
    """Per task: (distinct test questions that also appear in the few-shot file, distinct test questions)."""
    out = {}
    for t in tasks:
        fewshot, test = load_task(t, data_dir)
        qs = {r["question"] for r in test[:n_test]}
        out[t] = [len(qs & {r["question"] for r in fewshot}), len(qs)]
    return out
