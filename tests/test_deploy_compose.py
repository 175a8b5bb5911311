"""docker-compose.yml, checked without a Docker engine (CI has none): every file it mounts exists
and lands where the Prometheus and Grafana configs look for it, Prometheus scrapes the server's
service and port, the image's volumes are on named volumes, the stop grace covers the drain."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.deploy_tools import image_env

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _mounts(service: dict) -> dict[str, str]:
    """Container path -> host path (bind mounts) or volume name."""
    out = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        out[target] = source
    return out


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, duration
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def test_the_server_service():
    compose = _compose()
    server = compose["services"]["loraplex"]
    assert server["build"] == "."
    mounts = _mounts(server)
    env = image_env()
    for variable in ("LORAPLEX_HOME", "LORAPLEX_ADAPTER_STORE"):
        assert mounts[env[variable]] in compose["volumes"], f"{variable} is not on a named volume"
    assert "LORAPLEX_ADMIN_TOKEN" in server["environment"] and ":?" in server["environment"]["LORAPLEX_ADMIN_TOKEN"]
    assert _seconds(server["stop_grace_period"]) > float(env["LORAPLEX_DRAIN_SECONDS"])
    assert server["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert server["ports"] == [f"127.0.0.1:{env['LORAPLEX_PORT']}:{env['LORAPLEX_PORT']}"]


def test_prometheus_gets_its_config_and_rules_and_scrapes_the_server():
    compose = _compose()
    prometheus = compose["services"]["prometheus"]
    mounts = _mounts(prometheus)
    config_path = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    config_file = ROOT / mounts[config_path]
    assert config_file.is_file()
    config = yaml.safe_load(config_file.read_text())
    rules_dir = str(Path(config["rule_files"][0]).parent)
    assert (ROOT / mounts[rules_dir]).is_dir() and list((ROOT / mounts[rules_dir]).glob("*.yml"))
    host, port = config["scrape_configs"][0]["static_configs"][0]["targets"][0].split(":")
    assert host in compose["services"] and port == image_env()["LORAPLEX_PORT"]


def test_grafana_gets_its_provisioning_and_dashboards():
    grafana = _compose()["services"]["grafana"]
    mounts = _mounts(grafana)
    provisioning = ROOT / mounts["/etc/grafana/provisioning"]
    datasource = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards/loraplex.yml").read_text())["providers"][0]
    dashboards = ROOT / mounts[provider["options"]["path"]]
    assert (dashboards / "loraplex.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / mounts[str(Path(home).parent)] / Path(home).name).is_file()
