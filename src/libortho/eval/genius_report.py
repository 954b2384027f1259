"""Outputs of ``libortho experiment genius``: protocol text, JSON, markdown table, summary, plot."""
from __future__ import annotations

import datetime
import platform
import sys
from pathlib import Path

import torch


def protocol_text(s: dict) -> str:
    n = "all" if s["n_test"] is None else f"the first {s['n_test']}"
    return (
        f"Genius protocol: {s['shots']}-shot greedy generation on {', '.join(s['tasks'])} "
        f"({n} test items of each <task>.test.jsonl; shots are the first {s['shots']} rows of <task>.fewshot.jsonl "
        "whose question differs from the test question, as 'Question: ...\\nAnswer: ...' blocks, no chat template). "
        f"At most {s['max_new_tokens']} new tokens, left-padded batches of {s['batch_size']}; the answer is the text "
        "up to the first newline and is scored by its first integer (sign included) against the gold answer. "
        "Each distinct question is generated once (greedy decoding is deterministic), so tasks with repeated "
        "items (add1, mul1) carry fewer independent questions than items and their Wilson 95 % intervals, computed "
        "over items, are narrower than the true uncertainty. "
        f"Evaluation dtype {str(s['dtype']).replace('torch.', '')} on {s['device']}; every condition is decomposed "
        "once from a fresh copy of the fp32 model (decoder linears only; embeddings, norms and the tied head stay "
        "dense; with bf16 evaluation the scales and ortho values are fitted and stored in bf16). "
        "Bits per weight: all arrays of the decomposed linears (codes, scales, CSR ortho stream); rows at "
        "alpha=0 count the base alone. "
        f"Calibration (GPTQ and the hessian score): {s['calib_samples']} windows of {s['calib_seq_len']} tokens "
        f"(seed {s['seed']}) from austen-emma.txt, or, for the rows marked taskcalib, from the tasks' few-shot files "
        "(task data, never the test files). "
        + _overlap_text(s.get("fewshot_overlap")) +
        f"Perplexity: first {s['ppl_tokens']} tokens of austen-prideprejudice.txt (held out), windows of "
        f"{s['ppl_seq_len']}. Mean accuracy pools the tasks' items (with equal n per task: the plain mean); "
        "comparisons in the summary give the difference of mean accuracies with Newcombe's 95 % interval "
        "(unpaired, so conservative for these paired items). "
        "Skill retention = mean over tasks of acc/acc_bf16, over the tasks where bf16 scores at least 10 % (a "
        "ratio of near-zero accuracies is noise; the JSON lists the tasks used and also gives the pooled ratio "
        "mean acc / mean acc_bf16); ppl retention = ppl_bf16/ppl. "
        "SmolLM2 was distributed on a Q4_1 grid (asymmetric, groups of 32); every base here is symmetric "
        "with groups of 128 (INT4, INT3) or 64 (INT2), so none of them is lossless by construction.")


def _overlap_text(overlap) -> str:
    hits = {t: v for t, v in (overlap or {}).items() if v[0]}
    if not hits:
        return ""
    parts = ", ".join(f"{t} {a} of {b}" for t, (a, b) in hits.items())
    return (f"Distinct test questions that also appear in the few-shot files: {parts} (small tasks have few "
            "possible questions); prompts never contain the test question, but task calibration has seen those "
            "question/answer pairs. ")


def assemble(args, s: dict, meta: dict, rows: list[dict], command: str, seconds: float) -> dict:
    import transformers

    import libortho
    dev = s["device"]
    card = torch.cuda.get_device_name(torch.device(dev)) if dev.startswith("cuda") else \
        (platform.processor() or platform.machine())
    settings = {k: v for k, v in s.items() if k not in ("dtype", "conditions")}
    settings["dtype"] = str(s["dtype"]).replace("torch.", "")
    result = {
        "experiment": "genius", "command": command, "argv": sys.argv,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": dev.split(":")[0], "name": card},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "libortho": libortho.__version__},
        "model": {"name": args.model, "class": meta["class"], "params": meta["params"]},
        "seeds": {"calibration": s["seed"], "random_score": s["seed"]},
        "settings": settings,
        "calibration": meta["calibration"],
        "protocol": protocol_text(s),
        "seconds": seconds,
        "conditions": rows,
    }
    result["summary"] = summary(rows)
    return result


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _acc(v) -> str:
    return f"{100 * v['accuracy']:.1f} [{100 * v['ci_low']:.0f}, {100 * v['ci_high']:.0f}]"


def markdown_table(rows: list[dict], tasks) -> str:
    head = ["condition", "bits/w"] + [f"{t} % [95% CI]" for t in tasks] + \
        ["mean % [95% CI]", "skill ret.", "ppl", "ppl ret."]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        ppl = "-" if r["ppl"] is None else f"{r['ppl']:.2f}"
        sr = "-" if r["skill_retention"] is None else f"{r['skill_retention']:.2f}"
        pr = "-" if r["ppl_retention"] is None else f"{r['ppl_retention']:.3f}"
        cells = [r["name"], f"{r['bits_per_weight']:.3f}"] + [_acc(r["tasks"][t]) for t in tasks] + \
            [_acc(r["mean"]), sr, ppl, pr]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diff_interval(a: dict, b: dict) -> tuple[float, float]:
    """Newcombe's (Wilson-based, unpaired) 95 % interval of the accuracy difference a - b.

    The conditions answer the same items, so this ignores their pairing and is conservative."""
    p1, p2 = a["accuracy"], b["accuracy"]
    d = p1 - p2
    return (d - ((p1 - a["ci_low"]) ** 2 + (b["ci_high"] - p2) ** 2) ** 0.5,
            d + ((a["ci_high"] - p1) ** 2 + (p2 - b["ci_low"]) ** 2) ** 0.5)


def _compare(a: dict, b: dict) -> str:
    """'a vs b' in words from the pooled mean accuracies and the 95 % interval of their difference."""
    d = 100 * (a["mean"]["accuracy"] - b["mean"]["accuracy"])
    lo, hi = diff_interval(a["mean"], b["mean"])
    verdict = "better" if lo > 0 else ("worse" if hi < 0 else "no clear difference")
    return (f"{a['name']} ({_pct(a['mean']['accuracy'])} %, {a['bits_per_weight']:.2f} bits) vs {b['name']} "
            f"({_pct(b['mean']['accuracy'])} %, {b['bits_per_weight']:.2f} bits): {d:+.1f} points "
            f"[{100 * lo:+.1f}, {100 * hi:+.1f}], {verdict}")


def summary(rows: list[dict]) -> str:
    """A plain-language paragraph generated from the numbers."""
    by = {r["name"]: r for r in rows}
    out = []
    quant = [r for r in rows if r["name"] != "bf16" and r["skill_retention"] is not None
             and r["ppl_retention"] is not None]
    if quant:
        less = [r["name"] for r in quant if r["skill_retention"] > r["ppl_retention"]]
        more = [r["name"] for r in quant if r["skill_retention"] <= r["ppl_retention"]]
        verdict = ("skills degraded less than general text in most compressed conditions"
                   if len(less) > len(more) else
                   "skills did not degrade less than general text in most compressed conditions")
        out.append(f"Skill retention was above ppl retention in {len(less)} of {len(quant)} compressed conditions"
                   + (f" ({', '.join(less)})" if less else "")
                   + (f" and at or below it in {', '.join(more)}" if more else "")
                   + f": by this measure {verdict}. The two ratios are on different scales (accuracy vs exp of "
                   "the mean loss), so this compares retention as defined here, not 'how much ability' was lost.")
    if "bf16" in by:
        out.append(f"bf16 mean accuracy {_pct(by['bf16']['mean']['accuracy'])} %"
                   + (f", perplexity {by['bf16']['ppl']:.2f}." if by["bf16"]["ppl"] else "."))
    ortho3 = [r for r in rows if r["name"].startswith("int3-ortho-") and r["name"].endswith("%")]
    if "gptq-int3" in by and ortho3:
        out.append("INT3 + ortho against GPTQ INT3 without ortho: " +
                   "; ".join(_compare(r, by["gptq-int3"]) for r in ortho3) + ".")
    if "int3-ortho-1%" in by and "random-1%" in by:
        out.append("Hessian sieve against the random-score control at equal density: " +
                   _compare(by["int3-ortho-1%"], by["random-1%"]) + ".")
    if "int3-ortho-1%" in by and "int3-ortho-1%-taskcalib" in by:
        out.append("Calibrating on the tasks' few-shot files (task data) instead of public text: " +
                   _compare(by["int3-ortho-1%-taskcalib"], by["int3-ortho-1%"]) + ".")
    base_only = [r for r in rows if r["name"].startswith("gptq-") and r["config"] is not None]
    for r in ortho3 + [by[n] for n in ("int2-ortho-2%",) if n in by]:
        if base_only:
            near = min(base_only, key=lambda b: abs(b["bits_per_weight"] - r["bits_per_weight"]))
            if near["name"] != "gptq-int3" or not r["name"].startswith("int3"):
                out.append(f"Nearest base-only GPTQ row in bits: {_compare(r, near)}.")
    for r in rows:
        if r["name"].endswith("@alpha0") and r["name"][:-7] in by:
            out.append(f"Kill switch: {_compare(r, by[r['name'][:-7]])}.")
    return " ".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.2))
    dense = [r for r in rows if r["config"] is None]
    for r in dense:
        ax.axhline(100 * r["mean"]["accuracy"], ls="--", c="gray", lw=1)
        ax.text(0.01, 100 * r["mean"]["accuracy"], f" {r['name']} ({r['bits_per_weight']:.0f} bits)",
                va="bottom", fontsize=8, color="gray", transform=ax.get_yaxis_transform())
    for r in rows:
        if r["config"] is None:
            continue
        m = r["mean"]
        style = "s" if r["config"]["score"] == "none" else ("x" if r["config"]["score"] == "random" else "o")
        hollow = r["name"].endswith("@alpha0")
        y = 100 * m["accuracy"]
        ax.errorbar(r["bits_per_weight"], y, yerr=[[y - 100 * m["ci_low"]], [100 * m["ci_high"] - y]],
                    fmt=style, ms=6, capsize=2, mfc="none" if hollow else None)
        ax.annotate(r["name"], (r["bits_per_weight"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("average bits per weight (decoder linears)")
    ax.set_ylabel("mean few-shot accuracy over tasks, % (95 % CI)")
    ax.set_title("accuracy vs bits per weight")
    ax.grid(alpha=0.3)
    pts = [r for r in rows if r["skill_retention"] is not None and r["ppl_retention"] is not None]
    for r in pts:
        bx.scatter(r["ppl_retention"], r["skill_retention"], s=20)
        bx.annotate(r["name"], (r["ppl_retention"], r["skill_retention"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    if pts:
        lo = max(1e-12, min(min(r["ppl_retention"] for r in pts), 1.0) / 1.5)
        xs = [lo ** (1 - i / 200) for i in range(201)]  # y = x, a curve on the log x axis
        bx.plot(xs, xs, ls="--", c="gray", lw=1, label="skill retention = ppl retention")
        bx.set_xscale("log")
        bx.legend(fontsize=8, loc="lower right")
    bx.set_xlabel("ppl retention = ppl_bf16 / ppl (log)")
    bx.set_ylabel("skill retention = mean acc / acc_bf16")
    bx.set_title("skills vs general text (above the line: skills kept better)")
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_results(result: dict, out_dir: Path, name: str = "genius") -> list[Path]:
    from .report_util import write_json, write_text
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md, png = out_dir / f"{name}.json", out_dir / f"{name}.md", out_dir / f"{name}.png"
    write_json(js, result)
    tasks = result["settings"]["tasks"]
    d = result["device"]
    text = (f"# Genius: few-shot arithmetic under aggressive bases\n\n"
            f"`{result['command']}`\n\n{result['date']}, {d['name']} ({d['type']}), torch "
            f"{result['versions']['torch']}, transformers {result['versions']['transformers']}, model "
            f"{result['model']['name']}.\n\n{result['protocol']}\n\n"
            f"{markdown_table(result['conditions'], tasks)}\n\n{result['summary']}\n")
    write_text(md, text)
    plot(result["conditions"], png)
    return [js, md, png]


def add_retention(rows: list[dict], reference: str = "bf16", min_ref_accuracy: float = 0.1) -> None:
    """Mean accuracy over tasks (pooled counts) and, relative to the ``reference`` row: skill retention
    (mean over tasks of acc / acc_ref, over the tasks where the reference scores at least
    ``min_ref_accuracy``: a ratio of near-zero accuracies is noise), its pooled form (mean acc / mean
    acc_ref over all tasks) and ppl retention (ppl_ref / ppl)."""
    from .fewshot import wilson_interval
    ref = next((r for r in rows if r["name"] == reference), None)
    for r in rows:
        correct = sum(t["correct"] for t in r["tasks"].values())
        n = sum(t["n"] for t in r["tasks"].values())
        lo, hi = wilson_interval(correct, n)
        r["mean"] = {"accuracy": correct / n if n else 0.0, "ci_low": lo, "ci_high": hi, "n": n, "correct": correct}
    for r in rows:
        r["skill_retention"] = r["skill_retention_pooled"] = r["ppl_retention"] = None
        r["skill_retention_tasks"] = []
        if ref is None:
            continue
        used = [t for t in r["tasks"] if t in ref["tasks"] and ref["tasks"][t]["accuracy"] >= min_ref_accuracy
                and ref["tasks"][t]["accuracy"] > 0]
        if used:
            ratios = [r["tasks"][t]["accuracy"] / ref["tasks"][t]["accuracy"] for t in used]
            r["skill_retention"] = sum(ratios) / len(ratios)
        r["skill_retention_tasks"] = used
        if ref["mean"]["accuracy"] > 0:
            r["skill_retention_pooled"] = r["mean"]["accuracy"] / ref["mean"]["accuracy"]
        if r["ppl"] and ref["ppl"]:
            r["ppl_retention"] = ref["ppl"] / r["ppl"]


def _one_line(r) -> str:
    accs = " ".join(f"{t} {100 * v['accuracy']:.1f}%" for t, v in r["tasks"].items())
    ppl = f", ppl {r['ppl']:.2f}" if r["ppl"] is not None else ""
    return (f"{r['name']}: {r['bits_per_weight']:.3f} bits/w, {accs}{ppl} "
            f"(decompose {r['decompose_s']:.1f} s, eval {r['eval_s']:.1f} s)")
