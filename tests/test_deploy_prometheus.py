"""Prometheus and Grafana files (deploy/prometheus, deploy/grafana): promtool checks the configs
and rules and runs the rules' unit tests; every dashboard query parses; and every metric that
the rules, the dashboard and the endpoint picker's config name appears in a real /metrics scrape
of a running server that has served some traffic (histograms by their _bucket series)."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import httpx
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server.api.app import create_app
from server.api.background import BackgroundServer
from server.config import Settings
from server.model.config import ModelConfig
from tests.deploy_tools import find_tool
from tests.test_api_admin import ADMIN_TOKEN, AUTH, adapter_files

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
PROMETHEUS_OWN = {"up"}  # series Prometheus makes itself
# The endpoint picker's defaults for vLLM (its core-metrics-extractor), which loraplex aliases.
PICKER_VLLM_DEFAULTS = {"vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                        "vllm:lora_requests_info"}


def promtool(*args: str, cwd: Path = ROOT) -> str:
    path = find_tool("promtool")
    if path is None:
        pytest.fail("promtool is missing: `make tools` puts it in the venv (from Debian's prometheus package); "
                    "or install Prometheus' promtool on PATH")
    result = subprocess.run([path, *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_promtool_checks_the_rules_and_runs_their_unit_tests():
    out = promtool("check", "rules", *map(str, RULE_FILES))
    assert out.count("SUCCESS") == len(RULE_FILES)
    assert "SUCCESS" in promtool("test", "rules", "tests/loraplex-rules-test.yml", cwd=PROMETHEUS)


def _with_local_rules(config: dict, tmp_path: Path) -> Path:
    """The config with its rule_files pointing at this checkout's rules (the container path
    /etc/prometheus/rules is where docker-compose.yml mounts them)."""
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    config["rule_files"] = [str(PROMETHEUS / "rules" / "*.yml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_promtool_checks_the_compose_config_with_its_rules(tmp_path):
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    out = promtool("check", "config", str(_with_local_rules(config, tmp_path)))
    rules = sum(len(g["rules"]) for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"])
    assert f"SUCCESS: {rules} rules found" in out.replace("\n", " ") or out.count("rules found") == len(RULE_FILES)
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["loraplex:8000"]


def test_promtool_checks_the_kubernetes_config(tmp_path):
    config = yaml.safe_load((PROMETHEUS / "prometheus-kubernetes.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    # Debian's promtool is built without Kubernetes discovery ("field kubernetes_sd_configs not
    # found"): everything else of the job (its relabelling above all) is checked with a static
    # target in its place.
    probe = tmp_path / "probe.yml"
    probe.write_text("scrape_configs:\n  - job_name: x\n    kubernetes_sd_configs: [{role: pod}]\n")
    path = find_tool("promtool")
    has_kubernetes_sd = path and subprocess.run([path, "check", "config", str(probe)], capture_output=True,
                                                timeout=60).returncode == 0
    if not has_kubernetes_sd:
        job.pop("kubernetes_sd_configs")
        job["static_configs"] = [{"targets": ["10.0.0.1:8000"]}]
    promtool("check", "config", str(_with_local_rules(config, tmp_path)))
    # The relabelling keeps the pods the Deployment labels and annotates (deploy/k8s/base).
    deployment = yaml.safe_load((ROOT / "deploy/k8s/base/deployment.yaml").read_text())
    pod_meta = deployment["spec"]["template"]["metadata"]
    keep = {r["source_labels"][0]: r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    assert keep["__meta_kubernetes_pod_label_app_kubernetes_io_name"] == pod_meta["labels"]["app.kubernetes.io/name"]
    assert keep["__meta_kubernetes_pod_annotation_prometheus_io_scrape"] == pod_meta["annotations"]["prometheus.io/scrape"]


def _dashboard() -> dict:
    return json.loads((GRAFANA / "dashboards" / "loraplex.json").read_text())


def _dashboard_queries() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]


def test_the_dashboard_is_provisioned_against_the_provisioned_data_source():
    datasource = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    dashboard = _dashboard()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 12 and len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == datasource["uid"] and panel["targets"], panel["title"]
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/loraplex.yml").read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"


def _parse(expr: str):
    # Grafana's own variable, which Prometheus never sees.
    return promql_parser.parse(expr.replace("$__rate_interval", "5m"))


def test_every_dashboard_query_parses_and_the_parser_catches_a_bad_one():
    for expr in _dashboard_queries():
        _parse(expr)  # raises on a syntax error
    with pytest.raises(Exception):
        _parse("sum by (tier (rate(loraplex_adapter_cache_hits_total[5m]))")


def _selectors(expr: str) -> set[str]:
    names: set[str] = set()
    promql_parser.walk(_parse(expr), lambda node: names.add(node.name) if isinstance(
        node, promql_parser.VectorSelector) and node.name else None)
    return names


def _rules() -> list[dict]:
    return [rule for f in RULE_FILES for group in yaml.safe_load(f.read_text())["groups"] for rule in group["rules"]]


def named_metrics() -> tuple[set[str], set[str]]:
    """(metric names the rules, dashboard and picker config read; names the recording rules define)."""
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    read = set().union(*(_selectors(rule["expr"]) for rule in _rules()), *map(_selectors, _dashboard_queries()))
    picker = yaml.safe_load((ROOT / "deploy/k8s/inference-gateway/epp-config.yaml").read_text())
    engine = next(p for p in picker["plugins"] if p["type"] == "core-metrics-extractor")["parameters"]["engineConfigs"]
    for spec in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec"):
        read.add(engine[0][spec])
    return read - recorded - PROMETHEUS_OWN, recorded


def test_recorded_series_read_by_the_dashboard_and_alerts_are_defined():
    read = set().union(*(_selectors(r["expr"]) for r in _rules()), *map(_selectors, _dashboard_queries()))
    recorded = named_metrics()[1]
    assert {name for name in read if name.startswith("job:")} <= recorded
    assert {name for name in read if name.startswith("job:")}, "the dashboard reads the recorded series"


@pytest.fixture(scope="module")
def scrape(default_model_dir, tmp_path_factory) -> dict[str, list]:
    """/metrics of a real server after uploads, plain, streamed and adapter requests, a 404 and a 429."""
    settings = Settings.from_env(
        device="cpu", max_num_seqs=4, num_kv_blocks=64, max_model_len=256, max_loras=2, max_lora_rank=8,
        admin_token=ADMIN_TOKEN, adapter_store=str(tmp_path_factory.mktemp("adapters")), served_model_name="base",
        max_requests_per_tenant=1)
    model = ModelConfig.from_dir(default_model_dir)
    config, weights = adapter_files(model, rank=4)
    with BackgroundServer(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        put = http.put("/admin/adapters/acme", headers=AUTH, files={
            "adapter_config": ("adapter_config.json", config), "adapter_model": ("adapter_model.safetensors", weights)})
        assert put.status_code == 201, put.text
        body = {"model": "base", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        assert http.post("/v1/completions", json=body).status_code == 200
        assert http.post("/v1/completions", json=body, headers={"X-Customer-Id": "nobody"}).status_code == 404
        started = threading.Event()

        def hold_a_stream():
            with http.stream("POST", "/v1/completions", headers={"X-Customer-Id": "acme"},
                             json={**body, "max_tokens": 24, "stream": True, "ignore_eos": True}) as stream:
                for line in stream.iter_lines():
                    if line.startswith("data: "):
                        started.set()

        holder = threading.Thread(target=hold_a_stream)
        holder.start()
        assert started.wait(60)
        # acme has one request running already: max_requests_per_tenant=1 answers 429
        assert http.post("/v1/completions", json=body, headers={"X-Customer-Id": "acme"}).status_code == 429
        holder.join(60)
        text = http.get("/metrics").text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_every_metric_the_deploy_files_name_is_in_a_real_scrape(scrape):
    sample_names = {sample.name for samples in scrape.values() for sample in samples}
    read, _ = named_metrics()
    assert read, "no metric names found in the rules and dashboard"
    missing = sorted(read - sample_names)
    assert not missing, f"named in deploy/ but absent from /metrics: {missing}"
    for name in read:  # histograms are read by their buckets, counters by their _total
        if name.endswith("_bucket"):
            assert {name.replace("_bucket", "_sum"), name.replace("_bucket", "_count")} <= sample_names
    assert PICKER_VLLM_DEFAULTS <= sample_names  # the picker's vLLM defaults work unchanged too
    running = {s.name: s.value for s in scrape["vllm:num_requests_running"] + scrape["loraplex_num_requests_running"]}
    assert running["vllm:num_requests_running"] == running["loraplex_num_requests_running"]


def test_the_name_extraction_finds_every_selector():
    """The check above is only as good as this: names inside functions, aggregations, binary
    operators and ranges are all found; functions and label names are not taken for metrics."""
    expr = ("histogram_quantile(0.9, sum by (le) (rate(a_bucket{tier=\"host\"}[5m]))) / on() group_left "
            "sum(b_total offset 5m) > bool 3 or job:c:ratio")
    assert _selectors(expr) == {"a_bucket", "b_total", "job:c:ratio"}
    read, recorded = named_metrics()
    assert len(read) >= 20 and "loraplex_time_to_first_token_seconds_bucket" in read
    assert "job:loraplex_adapter_cache_hit:ratio_rate5m" in recorded
