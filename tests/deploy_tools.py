"""Where the deployment tests find their command-line tools: the venv's own bin directory first
(pip puts hadolint there; `make tools` puts promtool there), as pytest may run without it on PATH."""

from __future__ import annotations

import os
import shutil
import sysconfig


def find_tool(name: str) -> str | None:
    search = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    return shutil.which(name, path=search)
