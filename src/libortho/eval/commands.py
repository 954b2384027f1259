"""Subcommands of the experiments and benchmarks (``libortho experiment ...``, ``libortho bench ...``)."""


def register(sub) -> None:
    """Experiments and benchmarks are added here as they land."""
    return None
