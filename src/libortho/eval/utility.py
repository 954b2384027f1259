"""The utility experiment: perplexity vs bits per weight for SmolLM2 under RTN, GPTQ and LibOrtho.

Protocol: calibrate on austen-emma.txt (128 windows of 512 tokens, seed 0), evaluate perplexity on
austen-prideprejudice.txt (non-overlapping windows of 2048 tokens, GPTQ protocol); every linear of
the 30 decoder blocks is decomposed, symmetric groups of 128 (the hidden size 576 leaves a short last
group); bits per weight count codes, scales and the CSR arrays. Rows: bf16; RTN and GPTQ without
ortho; LibOrtho RTN + post-hoc Hessian sieve and LibOrtho GPTQ + in-sweep ortho at several densities,
each at alpha 1 and 0; a random-score control at 1 %.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from .report_util import environment, write_json, write_text

CAVEAT = ("SmolLM2-135M-Instruct ships as GGUF Q4_1 (asymmetric 4-bit, groups of 32), so its weights already "
          "lie on a 4-bit grid: re-quantizing with asymmetric g32 would be lossless. This experiment uses "
          "symmetric g128, which is not that grid; numbers are relative to the shipped (dequantized) model.")


def add_arguments(p):
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default=None)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--densities", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.05])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--calib", default=None, help="calibration text (default ../shared/data/text/austen-emma.txt)")
    p.add_argument("--eval-text", default=None, help="default ../shared/data/text/austen-prideprejudice.txt")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-eval-tokens", type=int, default=None)
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq", "libortho-rtn", "libortho-gptq", "random"])
    p.add_argument("--out-dir", default="experiments/results")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of OUT_DIR/utility.json (same protocol) and run only the missing ones")


def conditions(bits_list, densities, gs, methods, full_name="bf16"):
    from ..config import OrthoConfig
    rows = [(full_name, None)]
    for b in bits_list:
        if "rtn" in methods:
            rows.append((f"int{b}-rtn", OrthoConfig.base_only(bits=b, group_size=gs, method="rtn")))
        if "gptq" in methods:
            rows.append((f"int{b}-gptq", OrthoConfig.base_only(bits=b, group_size=gs, method="gptq")))
        for d in densities:
            if "libortho-rtn" in methods:
                rows.append((f"int{b}-libortho-rtn-hessian-{100 * d:g}%",
                             OrthoConfig(bits=b, group_size=gs, density=d, score="hessian", method="rtn")))
            if "libortho-gptq" in methods:
                rows.append((f"int{b}-libortho-gptq-{100 * d:g}%",
                             OrthoConfig(bits=b, group_size=gs, density=d, score="hessian", method="gptq")))
        if "random" in methods:
            rows.append((f"int{b}-random-1%", OrthoConfig(bits=b, group_size=gs, density=0.01, score="random",
                                                          method="gptq")))
    return rows


def _default(path, name):
    if path:
        return path
    from ..data import DATA_DIR
    return str(DATA_DIR / "text" / name)


def run(args):
    import libortho
    from ..data import tokenize
    from .ppl import perplexity
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    eval_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base, tok = libortho.load_model(args.model)
    calib_path, eval_path = _default(args.calib, "austen-emma.txt"), _default(args.eval_text, "austen-prideprejudice.txt")
    calib = libortho.calibration_data(tok, calib_path, args.calib_samples, args.calib_seq_len, seed=0)
    ids = tokenize(tok, libortho.read_text(eval_path))
    if args.max_eval_tokens:
        ids = ids[: args.max_eval_tokens]
    print(f"protocol: {__doc__.strip()}\ncalibration: {calib.description}\n"
          f"evaluation: {ids.numel()} tokens of {Path(eval_path).name}, windows of {args.seq_len}, {eval_dtype}\n")
    results = []
    out = {**environment(device), "model": args.model, "protocol": __doc__.strip(), "caveat": CAVEAT,
           "calibration": calib.description, "eval_text": Path(eval_path).name, "eval_tokens": int(ids.numel()),
           "seq_len": args.seq_len, "eval_dtype": str(eval_dtype), "rows": results}
    out_dir = Path(args.out_dir)
    full_name = "bf16" if eval_dtype == torch.bfloat16 else "fp32"
    todo = conditions(args.bits, args.densities, args.group_size, args.methods, full_name)
    if args.resume:
        out = resumed(out_dir / "utility.json", out)
        results = out["rows"]
        have = {r["name"] for r in results}
        todo = [(n, c) for n, c in todo if n not in have]
        print(f"resuming {out_dir / 'utility.json'}: {len(have)} rows kept, to run: {[n for n, _ in todo]}")
    for name, cfg in todo:
        model = copy.deepcopy(base).to(device)
        if cfg is not None and eval_dtype == torch.bfloat16:
            cfg = cfg.replace(dtype="bfloat16")  # fit the grid in the dtype it will run in
        row = {"name": name, "config": None if cfg is None else cfg.to_dict()}
        if cfg is not None:
            t = time.time()
            libortho.decompose(model, cfg, calib=calib if cfg.needs_calibration else None, device=device,
                               progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            row["decompose_s"] = time.time() - t
            tot = libortho.report(model)["total"]
            row.update(bits_per_weight=tot["bits_per_weight"], ortho_nnz=tot["ortho_nnz"])
        else:
            row["bits_per_weight"] = 16.0
        model = libortho.cast_model(model, eval_dtype)
        row["ppl"] = perplexity(model, tok, "", seq_len=args.seq_len, ids=ids, progress=False)
        if cfg is not None and cfg.has_ortho:
            with libortho.alpha(model, 0.0):
                row["ppl_alpha0"] = perplexity(model, tok, "", seq_len=args.seq_len, ids=ids, progress=False)
        row["date"] = environment(device)["date"]
        results.append(row)
        results.sort(key=row_order)
        if name in out.get("not_run", []):
            out["not_run"].remove(name)
        print(f"{name:34s} bits/w {row['bits_per_weight']:6.3f}  ppl {row['ppl']:9.3f}"
              + (f"  alpha=0 {row['ppl_alpha0']:9.3f}" if "ppl_alpha0" in row else "")
              + (f"  ({row['decompose_s']:.1f} s)" if "decompose_s" in row else ""), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_json(out_dir / "utility.json", out)  # after every row: a cut-off run keeps what it measured
    write_json(out_dir / "utility.json", out)
    md = markdown(out)
    write_text(out_dir / "utility.md", md)
    plot(out, out_dir / "utility.png")
    print("\n" + md)


def resumed(path: Path, fresh: dict) -> dict:
    """The earlier result at ``path`` with this run's command appended; refuses another protocol."""
    import json
    if not path.exists():
        raise SystemExit(f"--resume: no {path} to resume")
    old = json.loads(path.read_text())
    keys = ("model", "protocol", "calibration", "eval_text", "eval_tokens", "seq_len", "eval_dtype")
    diff = [k for k in keys if old.get(k) != fresh.get(k)]
    if diff:
        raise SystemExit(f"--resume: {path} was made with other settings ({', '.join(diff)})")
    runs = old["command"].count("(run ") + (0 if "(run " in old["command"] else 1)
    old["command"] += f"; {fresh['command']}  (run {runs + 1}, {fresh['date'][:16]}, {fresh['device']}, "\
                      f"torch {fresh['torch']})"
    return old


def row_order(row) -> tuple:
    """bf16 first, then by bits (high first), then as :func:`conditions` lists a bits block."""
    name = row["name"]
    if row.get("config") is None:
        return (0,)
    bits, rest = name.split("-", 1)
    kinds = ["rtn", "gptq", "libortho-rtn-hessian", "libortho-gptq", "random"]
    kind = next((i for i, k in sorted(enumerate(kinds), key=lambda t: -len(t[1])) if rest.startswith(k)), 9)
    density = row["config"].get("density", 0.0) if kind in (2, 3) else 0.0
    order = kind if kind < 2 else (2 if kind < 4 else 4)
    return (1, -int(bits[3:]), order, density, kind)


def markdown(out) -> str:
    full = out["rows"][0]
    base = full["ppl"]
    lines = [f"Perplexity of {out['model']} on {out['eval_tokens']} tokens of {out['eval_text']} "
             f"(windows of {out['seq_len']}, {out['eval_dtype']}), {out['device']}, {out['date'][:10]}.",
             f"Calibration: {out['calibration']}.", "", f"> {out['caveat']}", "",
             f"| condition | bits/weight | ppl alpha=1 | vs {full['name']} | ppl alpha=0 | decompose s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in out["rows"]:
        a0 = f"{r['ppl_alpha0']:.2f}" if "ppl_alpha0" in r else "-"
        sec = f"{r['decompose_s']:.1f}" if "decompose_s" in r else "-"
        lines.append(f"| {r['name']} | {r['bits_per_weight']:.3f} | {r['ppl']:.2f} | "
                     f"{100 * (r['ppl'] / base - 1):+.1f} % | {a0} | {sec} |")
    return "\n".join(lines) + "\n"


def plot(out, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 5.5))
    full = out["rows"][0]
    ax.axhline(full["ppl"], color="black", ls="--", lw=1, label=f"{full['name']} (16 bits)")
    groups = {}
    for r in out["rows"][1:]:
        head, _, tail = r["name"].partition("-libortho-")
        groups.setdefault(head + ("-libortho-" + tail.rsplit("-", 1)[0] if tail else ""), []).append(r)
    colors = plt.get_cmap("tab20").colors
    for i, (key, rows) in enumerate(groups.items()):
        rows = sorted(rows, key=lambda r: r["bits_per_weight"])
        c = colors[(2 * i) % 20]
        ax.plot([r["bits_per_weight"] for r in rows], [r["ppl"] for r in rows], "o-", color=c, label=key)
        if any("ppl_alpha0" in r for r in rows):
            ax.plot([r["bits_per_weight"] for r in rows], [r.get("ppl_alpha0", float("nan")) for r in rows],
                    "x:", color=c, alpha=0.6, label=f"{key} at alpha=0")
    ax.set_xlabel("average bits per weight (codes + scales + CSR)")
    ax.set_ylabel("perplexity (log)")
    ax.set_yscale("log")
    ax.set_title(f"{out['model']}: perplexity vs bits per weight ({out['device']})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    import argparse
    _p = argparse.ArgumentParser(description=__doc__)
    add_arguments(_p)
    run(_p.parse_args())
