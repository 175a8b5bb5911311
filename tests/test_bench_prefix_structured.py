"""The prefix-caching / structured-output benchmark end to end on the CPU (tiny random checkpoint,
two server subprocesses, streaming clients): it runs, the cache hits in the cached phase only,
the structured phase's answers succeed, and the JSON and the table are written."""

from __future__ import annotations

import pytest

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # a minute or so on the 2-core CI machine: make test-slow
def test_prefix_structured_bench_runs_end_to_end_on_cpu(tmp_path, default_model_dir):
    out = tmp_path / "out"
    command = [sys.executable, "loadtest/bench_prefix_structured.py", "--out", str(out), "--shape", "tiny",
               "--device", "cpu", "--tokenizer", str(default_model_dir), "--tenants", "2", "--system-tokens", "64",
               "--user-tokens", "8", "--chat-max-tokens", "4", "--chat-concurrency", "2",
               "--structured-concurrency", "2", "--structured-prompt-tokens", "16", "--structured-max-tokens", "16",
               "--duration", "3", "--warmup", "0.5", "--time-budget", "400"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    result = json.loads((out / "prefix_structured_tiny_cpu.json").read_text())
    assert result["error"] is None and result["uploads"]["ok"] == 2
    phases = result["phases"]
    assert set(phases) == {"chat_cache_on", "chat_cache_off", "structured_free", "structured_json"}
    for phase in phases.values():
        assert phase["errors"] == {} and phase["requests"]["ok"] > 0 and phase["ttft_s"]["p50"] > 0
    on, off = phases["chat_cache_on"]["server"], phases["chat_cache_off"]["server"]
    assert on["loraplex_prefix_cache_hits_total"] > 0.5 * on["loraplex_prefix_cache_queries_total"]
    assert off["loraplex_prefix_cache_hits_total"] == 0
    assert {t["name"].split(" (")[0] for t in result["targets"]} == {
        "TTFT p50 cache off / on", "structured output per-token overhead"}
    assert "chat_cache_on" in (out / "prefix_structured_tiny_cpu.txt").read_text()
