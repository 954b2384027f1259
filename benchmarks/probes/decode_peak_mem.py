"""Probe: why alpha 0's decode peak memory reads higher than alpha 1's on the same model.

The decode bench (``bench_model``) runs alpha 1 and then alpha 0 on one decomposed model and records
``torch.cuda.max_memory_allocated`` after a reset; SmolLM2 read 0.40 GiB at alpha 0 against 0.28 at alpha 1
(session 52), the 7B shape +67 MB. Either alpha 0's step holds more, or the earlier run leaves memory behind that
the later one's peak counts. This runs ``bench_model`` on a SmolLM2-shaped random Llama twice, the variants in both
orders, and prints the memory allocated before and after each measured decode next to its peak: the first time with
``_free`` as it was (cuBLAS's workspaces kept), the second as it is.

    python benchmarks/probes/decode_peak_mem.py [--mode compile] [--batches 1 8]
"""
from __future__ import annotations

import argparse
import datetime
import json

import torch

from libortho.eval import bench_decode as bd


def smol_config():
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)


def traced(measure, log):
    """Wrap measure_decode: memory allocated before it, after it, and its peak (MiB)."""
    def run(model, prompts, *a, **k):
        before = torch.cuda.memory_allocated()
        r = measure(model, prompts, *a, **k)
        log.append({"desc": k.get("desc"), "before_mib": before / 2**20, "peak_mib": r["peak_mem_bytes"] / 2**20,
                    "after_mib": torch.cuda.memory_allocated() / 2**20})
        print(f"    {k.get('desc')}: allocated before {log[-1]['before_mib']:.1f} MiB, peak "
              f"{log[-1]['peak_mib']:.1f}, after {log[-1]['after_mib']:.1f}", flush=True)
        return r
    return run


def write_live(path):
    """Every live block of 1 MiB or more and where it was allocated (innermost Python frames first)."""
    lines = [f"allocated {torch.cuda.memory_allocated() / 2**20:.1f} MiB"]
    for seg in torch.cuda.memory._snapshot()["segments"]:
        for b in seg["blocks"]:
            if b["state"] != "active_allocated" or b["size"] < 2**20:
                continue
            frames = [f"{f['filename'].split('site-packages/')[-1]}:{f['line']} {f['name']}"
                      for f in b.get("frames", []) if f["filename"].endswith(".py")][:8]
            lines.append(f"{b['size'] / 2**20:.1f} MiB (stream {seg['stream']}):\n    " + "\n    ".join(frames))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:40]), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="compile", choices=["graph", "compile"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=None, help="JSON of the trace")
    ap.add_argument("--live", default=None, help="text file: the blocks still allocated after the first order, "
                    "1 MiB or more, with the Python frames that allocated them")
    a = ap.parse_args()
    bd.load_bench_model = lambda name, device: (bd.random_llama(smol_config(), device), None, "SmolLM2-shaped random")
    log = []
    bd.measure_decode = traced(bd.measure_decode, log)
    device = torch.device("cuda")
    from libortho.ops import cuda as ocuda
    if not ocuda.available():
        raise SystemExit(f"the LibOrtho CUDA kernels are not available ({ocuda._state['error']})")
    if a.live:
        torch.cuda.memory._record_memory_history(max_entries=200000)
    # the first order runs as before the fix (bench_decode._free did not clear cuBLAS's workspaces), the second with it
    clear = torch._C._cuda_clearCublasWorkspaces
    torch._C._cuda_clearCublasWorkspaces = lambda: None
    for i, order in enumerate((["alpha1", "alpha0"], ["alpha0", "alpha1"])):
        p = argparse.ArgumentParser()
        bd.add_arguments(p)
        args = p.parse_args(["--models", "tiny", "--variants", *order, "--mode", a.mode, "--batches",
                             *map(str, a.batches), "--new-tokens", str(a.new_tokens), "--prefill-len", "0",
                             "--reps", "1", "--no-progress"])
        args.glu = args.glu and not args.no_fuse
        print(f"order {order}: allocated at the start {torch.cuda.memory_allocated() / 2**20:.1f} MiB", flush=True)
        bd.bench_model("smol-shape", args, device)
        torch._dynamo.reset()
        if i == 0:
            if a.live:
                write_live(a.live)
            torch._C._cuda_clearCublasWorkspaces = clear
            clear()
            torch.cuda.empty_cache()
            print(f"after clearing cuBLAS's workspaces: allocated {torch.cuda.memory_allocated() / 2**20:.1f} MiB",
                  flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "trace": log}, f, indent=1)


if __name__ == "__main__":
    main()
