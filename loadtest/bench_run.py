"""What the issue-11 benchmark scripts share: a progress printer stamped with the seconds since
the run began, the device they run on (name and the slug their JSON files are named by), and the
environment for the processes they start (this checkout first on PYTHONPATH)."""

from __future__ import annotations

import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def progress_printer():
    """A `say(text)` that prints `[   12.3s] text` and flushes."""
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {text}", flush=True)

    return say


def device_and_name() -> tuple[str, str]:
    """("cuda", "NVIDIA H200") or ("cpu", "cpu")."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_name(0)
    return "cpu", "cpu"


def device_slug(name: str) -> str:
    """"NVIDIA H200" -> "h200", as in the results' file names."""
    return name.lower().replace("nvidia", "").strip().replace(" ", "_")


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env
