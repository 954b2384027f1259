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
    return {"command": "libortho " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": card,
            "torch": torch.__version__, "transformers": transformers.__version__}


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1))
