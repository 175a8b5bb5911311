"""`python -m loadtest` against the real server on the CPU (default model): the companion uploads
two tenants' adapters, then short Poisson and closed-loop runs over them, streaming; each
report's counts must equal what the server's own Prometheus counters saw over the run."""

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.server_process import ServerProcess, free_port
from loadtest.workload import Lengths, Popularity, Workload, poisson_arrivals

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_dir):
    work = tmp_path_factory.mktemp("loadgen")
    token = secrets.token_hex(16)
    proc = ServerProcess(["--device", "cpu", "--model", str(default_model_dir), "--home", str(work / "home"),
                          "--adapter-store", str(work / "adapters"), "--max-loras", "4"],
                         dict(os.environ, PYTHONPATH=str(REPO), LORAPLEX_ADMIN_TOKEN=token),
                         work / "server.log", REPO, "127.0.0.1", free_port())
    proc.start()
    try:
        proc.wait_ready(300)
        yield proc.base_url, token, default_model_dir
    finally:
        proc.stop()


def loadtest(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loadtest", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_the_companion_uploads_adapters_of_mixed_ranks(server, tmp_path):
    url, token, model_dir = server
    done = loadtest("adapters", "--url", url, "--admin-token", token, "--model-config", str(model_dir),
                    "--count", "2", "--prefix", "lg-", "--ranks", "8,16", "--out-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"] == 2 and "2/2 adapters" in done.stderr
    ranks = [json.loads((tmp_path / f"lg-{i}" / "adapter_config.json").read_text())["r"] for i in range(2)]
    assert ranks == [8, 16]
    refused = loadtest("adapters", "--url", url, "--admin-token", "wrong", "--model-config", str(model_dir),
                       "--count", "1", "--prefix", "lg-x")
    assert refused.returncode == 1 and json.loads(refused.stdout)["errors"] == {"http_401": 1}


@pytest.mark.parametrize("mode", [["--rate", "3"], ["--concurrency", "3"]], ids=["poisson", "closed"])
def test_a_run_reports_what_the_server_counted(server, tmp_path, mode):
    url, _, _ = server
    out = tmp_path / "run.json"
    done = loadtest("run", "--url", url, *mode, "--duration", "4", "--tenants", "2", "--tenant-prefix", "lg-",
                    "--popularity", "zipf:1", "--prompt-tokens", "4-12", "--output-tokens", "2-6",
                    "--slo-ttft", "60", "--slo-itl", "60", "--out", str(out), "--plots", str(tmp_path))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    summary, server_counts = report["summary"], report["server"]
    sent = summary["all_requests"]["sent"]
    assert sent >= 3 and summary["all_requests"]["ok"] == sent and summary["status"] == {"200": sent}
    assert set(summary["tenants"]) <= {"lg-0", "lg-1"} and sum(t["requests"] for t in summary["tenants"].values()) == sent
    # the server's books over the run: every request answered 2xx, every token generated
    assert server_counts['loraplex_http_requests_total{endpoint="/v1/completions"}'] == sent
    assert server_counts['loraplex_generations_total{finish_reason="length"}'] == sent  # ran to max_tokens
    assert server_counts["loraplex_generation_tokens_total"] == summary["all_requests"]["completion_tokens"]
    if mode[0] == "--rate":  # the open loop sent exactly its Poisson arrivals
        assert report["offered"]["requests"] == sent
    assert report["server_means"]["time_to_first_token_seconds_mean"] > 0
    assert summary["slo"]["attainment"] == 1.0 and summary["ttft_s"]["count"] > 0 and summary["itl_s"]["count"] > 0
    assert (tmp_path / "latency_cdf.png").stat().st_size > 0
    assert "output tok/s" in done.stdout and " done " in done.stderr  # the summary, and progress while it ran


def test_reports_plot_against_the_number_of_tenants(server, tmp_path):
    url, _, _ = server
    paths = []
    for tenants in (0, 2):
        path = tmp_path / f"t{tenants}.json"
        done = loadtest("run", "--url", url, "--concurrency", "2", "--duration", "2", "--tenants", str(tenants),
                        "--tenant-prefix", "lg-", "--tenant-via", "model", "--prompt-tokens", "6",
                        "--output-tokens", "3", "--out", str(path), "--quiet")
        assert done.returncode == 0, done.stderr
        paths.append(str(path))
    plotted = loadtest("plot", *paths, "--against", "tenants", "--out", str(tmp_path / "plots"))
    assert plotted.returncode == 0, plotted.stderr
    assert (tmp_path / "plots" / "throughput_vs_tenants.png").stat().st_size > 0


def test_the_workload_is_reproducible_and_follows_its_distributions():
    work = Workload(tuple(f"t{i}" for i in range(10)), Popularity.parse("zipf:1"), Lengths.parse("8-512"),
                    Lengths.parse("16"), (10, 1000), seed=3)
    first = [work.request(n) for n in range(4000)]
    assert first[:50] == [work.request(n) for n in range(50)]  # request n is the same wherever it is drawn
    counts = [sum(r.tenant == f"t{i}" for r in first) for i in range(10)]
    harmonic = sum(1 / k for k in range(1, 11))
    assert abs(counts[0] / 4000 - 1 / harmonic) < 0.03 and abs(counts[1] / counts[0] - 0.5) < 0.1
    lengths = [len(r.prompt) for r in first]
    assert min(lengths) >= 8 and max(lengths) <= 512 and abs(sum(lengths) / 4000 - 260) < 12
    assert {r.max_tokens for r in first} == {16} and all(10 <= t < 1000 for r in first[:20] for t in r.prompt)
    times = poisson_arrivals(20.0, 100.0, seed=1)
    assert abs(len(times) - 2000) < 150 and times == sorted(times) and times == poisson_arrivals(20.0, 100.0, 1)
    for bad in ("0", "9-3", "x"):
        with pytest.raises(ValueError):
            Lengths.parse(bad)
    for bad in ("zipf:0", "zipf:a", "gauss"):
        with pytest.raises(ValueError):
            Popularity.parse(bad)
