"""A short soak of the real server (loadtest/soak.py, one minute on the CPU; both runs under `make test-slow`): mixed traffic,
admin churn, disconnects, bad requests and bursts past the tenant bound at once; no request may
be lost (each completes, or is refused with a 4xx envelope, or ends with an error event, or was
left by its client), no 5xx. Memory flatness is the ten-minute run's figure
(`PYTHONPATH=. python3 loadtest/soak.py --minutes 10`, in loadtest/results); one minute is mostly
warm-up, so here the memory bound is loose."""

import json

import pytest

from loadtest import soak


@pytest.mark.slow  # a minute or so on the 2-core CI machine: make test-slow
def test_a_minute_of_mixed_traffic_and_churn_loses_nothing(tmp_path):
    code = soak.main(["--minutes", "1", "--out", str(tmp_path), "--max-growth-mb", "512"])
    result = json.loads((tmp_path / "soak_cpu.json").read_text())
    assert result["lost"] == 0, result["loss_examples"]
    assert result["server_5xx"] == 0 and result["server_exit_code"] == 0
    outcomes = result["outcomes"]
    for kind in ("generate/complete", "admin_upload/complete", "leave_early/left", "burst/refused_429",
                 "bad_request/refused_400"):
        assert outcomes.get(kind, 0) > 0, (kind, outcomes)  # every kind of traffic really ran
    assert code == 0, result


@pytest.mark.slow
def test_ten_minutes_lose_nothing_and_memory_stays_flat(tmp_path):
    """The full soak (`make test-slow`): the default bounds, memory included."""
    code = soak.main(["--minutes", "10", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "soak_cpu.json").read_text())
    assert result["lost"] == 0 and result["server_5xx"] == 0, result["loss_examples"]
    assert code == 0, {k: result[k] for k in ("memory_mb", "metric_series")}
