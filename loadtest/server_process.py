"""`loraplex serve` as a subprocess: started, awaited until /ready, and always stopped.

The server gets its own process group (so a stop reaches anything it started) and, on Linux,
a parent-death signal, so that even a benchmark killed with SIGKILL leaves no server behind.
Its stdout and stderr go to a log file, whose tail is printed when it fails to start.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

READY_POLL_S = 0.5
_ACCESS_LINE = re.compile(r'"[A-Z]+ \S+ HTTP/[\d.]+" \d{3}')  # uvicorn: "POST /v1/completions HTTP/1.1" 200
STOP_GRACE_S = 30.0  # uvicorn's own graceful shutdown is 10 s


class ServerStartError(RuntimeError):
    """The server exited or did not become ready in time; the message ends with its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _parent_death_signal():
    """A preexec_fn that asks Linux to SIGKILL the child when the benchmark dies, or None.
    libc is resolved here, in the parent: the child between fork and exec should not dlopen."""
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux: the try/finally in the benchmark still stops the server
    return lambda: prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ServerProcess:
    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, cwd: Path, host: str, port: int):
        self.command = [sys.executable, "-m", "server.cli", "serve", "--host", host, "--port", str(port), *args]
        self.env, self.log_path, self.cwd = env, log_path, cwd
        self.base_url = f"http://{host}:{port}"
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_parent_death_signal())

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds until GET /ready answered 200; fails fast when the process exits."""
        start = time.monotonic()
        with httpx.Client(timeout=5.0) as client:
            while True:
                code = self.exit_code()
                if code is not None:
                    raise ServerStartError(f"the server exited with code {code} before /ready\n{self.log_tail()}")
                elapsed = time.monotonic() - start
                if elapsed > timeout_s:
                    raise ServerStartError(f"the server was not ready after {timeout_s:.0f} s\n{self.log_tail()}")
                try:
                    if client.get(f"{self.base_url}/ready").status_code == 200:
                        return time.monotonic() - start
                except httpx.HTTPError:
                    pass  # not listening yet
                time.sleep(READY_POLL_S)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL to the whole group after STOP_GRACE_S; returns the exit code."""
        if self.proc is None:
            return None
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    pass
            _kill_group(self.proc.pid)  # also whatever the server left behind in its group
            self.proc.wait(10)
        finally:
            if self._log is not None:
                self._log.close()
        return self.proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the log, without uvicorn's access lines (they would hide the error)."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        text = [line for line in text if not _ACCESS_LINE.search(line)]
        return "\n".join(f"  | {line}" for line in text[-lines:])


def start_bench_server(checkpoint: Path, workdir: Path, device: str, log_path: Path, repo: Path,
                       extra_flags: list[str] = (), host: str = "127.0.0.1", timeout_s: float = 300.0,
                       say=print) -> tuple[ServerProcess, str]:
    """`loraplex serve` on a checkpoint with a fresh admin token, its home and adapter store under
    `workdir`, importing `server` from `repo`; returns it ready, and the admin token."""
    import secrets

    admin_token = secrets.token_hex(16)
    env = dict(os.environ, LORAPLEX_ADMIN_TOKEN=admin_token)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH", "")) if p)
    flags = ["--model", str(checkpoint), "--device", device, "--home", str(workdir / "home"),
             "--adapter-store", str(workdir / "adapters"), *extra_flags]
    server = ServerProcess(flags, env, log_path, repo, host, free_port(host))
    say(f"starting the server: {' '.join(server.command)}")
    server.start()
    try:
        say(f"  ready after {server.wait_ready(timeout_s):.1f} s")
    except ServerStartError:
        server.stop()
        raise
    return server, admin_token


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
