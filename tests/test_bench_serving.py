"""The serving benchmark, end to end on the CPU: a tiny random checkpoint, the real server as a
subprocess, adapters through the admin API, streaming clients in worker processes, the JSON.
Plus the two pieces of arithmetic its figures rest on (token placement, percentiles)."""

from __future__ import annotations

import pytest

import json
import os
import subprocess
import sys
from pathlib import Path

from loadtest.serving_report import percentiles, tokens_per_chunk

REPO = Path(__file__).resolve().parent.parent


def test_tokens_without_their_own_event_go_to_the_longest_gaps():
    times = [0.0, 0.01, 0.05, 0.06, 0.07]  # the event at 0.05 came after a ~4-step gap
    assert tokens_per_chunk(times, 5) == [1, 1, 1, 1, 1]
    assert tokens_per_chunk(times, 8) == [1, 1, 4, 1, 1]
    assert tokens_per_chunk(times, None) == [1, 1, 1, 1, 1]  # no usage event: one token per event
    assert tokens_per_chunk([0.3], 4) == [4]
    assert sum(tokens_per_chunk(times, 40)) == 40


def test_percentiles_interpolate_between_ranks():
    stats = percentiles([float(v) for v in range(1, 102)])  # 1..101
    assert (stats["p50"], stats["p90"], stats["p99"], stats["max"], stats["count"]) == (51, 91, 100, 101, 101)
    assert percentiles([]) is None


@pytest.mark.slow  # a minute or so on the 2-core CI machine: make test-slow
def test_serving_bench_runs_end_to_end_on_cpu(tmp_path, default_model_dir):
    out = tmp_path / "out"
    command = [
        sys.executable, "loadtest/bench_serving.py", "--out", str(out), "--shape", "tiny", "--device", "cpu",
        "--tokenizer", str(default_model_dir), "--phases", "base@2,tenants2@2", "--warmup", "0.3", "--duration", "1.5",
        "--prompt-tokens", "16", "--max-tokens", "4", "--engine-batch", "2", "--engine-adapters", "2",
        "--engine-decode-steps", "2", "--client-procs", "2", "--drain-timeout", "20", "--server-timeout", "120",
        "--workdir", str(tmp_path / "work"),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    result = json.loads((out / "serving_bench_tiny_cpu.json").read_text())
    assert result["error"] is None
    assert (out / result["server"]["log"]).stat().st_size > 0
    assert result["server"]["exit_code"] is not None  # stopped
    assert result["copy_bandwidth"]["bytes_per_s"] > 0
    assert result["engine_alone"].get("error") is None, result["engine_alone"].get("error")
    assert result["engine_alone"]["base_step_s"] > 0 and result["engine_alone"]["adapters_step_s"] > 0
    loops = result["engine_alone"]["closed_loop"]
    assert loops["output_tokens"] == 4 and loops["base"]["tokens_per_s"] > 0 and loops["adapters"]["tokens_per_s"] > 0
    assert result["first_request"]["ok"] and result["first_request"]["tokens"] == 4
    assert result["first_request"]["ttft_s"] > 0
    assert result["uploads"]["ok"] == 2 and result["uploads"]["errors"] == {}
    assert result["first_adapter_request"]["ok"]

    phases = {p["name"]: p for p in result["phases"]}
    assert list(phases) == ["base@2", "tenants2@2"]
    for phase in phases.values():
        assert phase["errors"] == {}, phase["error_examples"]
        assert phase["output_tokens_per_s"] > 0 and phase["requests"]["measured"] > 0
        assert phase["ttft_s"]["p50"] > 0 and phase["itl_s"]["count"] > 0
        assert phase["output_tokens_mean"] == 4
        assert phase["server"]["steps"] > 0 and phase["server"]["batch_size_mean"] > 0
        assert phase["roofline"]["step_s"] > 0
    assert phases["tenants2@2"]["server"]["distinct_adapters_mean"] > 0  # the adapters were really applied
    assert phases["base@2"]["server"]["distinct_adapters_mean"] == 0
    assert phases["tenants2@2"]["touch"] == {"seconds": phases["tenants2@2"]["touch"]["seconds"], "tenants": 2,
                                             "errors": 0}  # both adapters loaded before the phase
    assert "touch" not in phases["base@2"] and result["settings"]["stagger_first_wave"] is True
    assert any(t["phase"] == "tenants2@2" and t["name"].startswith("tokens/s") for t in result["targets"])
    assert any(t["phase"] == "base@2" and t["name"].startswith("engine-alone closed loop") for t in result["targets"])
    assert "tenants2@2" in proc.stdout  # the table
