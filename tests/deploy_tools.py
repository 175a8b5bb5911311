"""Helpers of the deployment tests: where their command-line tools are (the venv's own bin
directory first: pip puts hadolint and kubectl there, `make tools` puts promtool there, and pytest
may run without it on PATH), and the container image's environment as the Dockerfile sets it."""

from __future__ import annotations

import os
import re
import shutil
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def find_tool(name: str) -> str | None:
    search = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    return shutil.which(name, path=search)


def image_env() -> dict[str, str]:
    """The ENV of the Dockerfile's runtime (last) stage."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    final = text.rsplit("\nFROM ", 1)[1]
    env = {}
    for line in final.splitlines():
        if line.startswith("ENV "):
            env.update(dict(pair.split("=", 1) for pair in line[4:].split()))
    return env
