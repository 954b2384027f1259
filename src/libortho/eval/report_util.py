"""Shared bits of the experiment reports: environment stamp, writing JSON/markdown atomically."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch


def environment(device) -> dict:
    import transformers
    dev = torch.device(device)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"command": _command(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": card,
            "torch": torch.__version__, "transformers": transformers.__version__}


def _command() -> str:
    """How this process was started: ``libortho ...`` for the CLI, ``python -m libortho.eval.X ...`` for a module."""
    if not sys.argv:
        return ""
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    prog = Path(sys.argv[0])
    if prog.suffix == ".py" and prog.parent.name == "eval" and prog.stem != "__main__":
        return f"python -m libortho.eval.{prog.stem} {args}"
    return f"libortho {args}"


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1))
