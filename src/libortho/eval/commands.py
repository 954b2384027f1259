"""Subcommands of the experiments and benchmarks: ``libortho experiment NAME``, ``libortho bench NAME``.

Each listed module defines ``add_arguments(parser)`` and ``run(args)``; it is imported when the
parser is built, so keep heavy imports inside ``run``.
"""
import importlib

EXPERIMENTS = {
    "utility": ("libortho.eval.utility", "perplexity vs bits per weight on SmolLM2 (issue: Hessian-aware decomposition)"),
    "privacy": ("libortho.eval.privacy", "canary extraction/exposure vs alpha, with controls"),
    "genius": ("libortho.eval.genius", "few-shot arithmetic accuracy under aggressive bases"),
}
BENCHMARKS = {
    "kernels": ("libortho.eval.bench_kernels", "kernel microbenchmark vs bf16 and torch int4"),
    "decode": ("libortho.eval.bench_decode", "end-to-end decode tokens/s"),
}


def _add_group(sub, name, help_text, table):
    group = sub.add_parser(name, help=help_text).add_subparsers(dest="what", required=True)
    for key, (module, text) in table.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue  # not built yet
        p = group.add_parser(key, help=text)
        mod.add_arguments(p)
        p.set_defaults(fn=mod.run)


def register(sub) -> None:
    _add_group(sub, "experiment", "run an experiment (JSON + markdown + plot)", EXPERIMENTS)
    _add_group(sub, "bench", "benchmarks (GPU)", BENCHMARKS)
