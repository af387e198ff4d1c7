"""deploy/k8s/: every manifest parses, references resolve, probes hit real routes, the termination grace
period covers preStop plus the drain, and the KServe examples serve the same model repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

K8S_QUANTITY = re.compile(r"^\d+(\.\d+)?(m|Mi|Gi|Ki)?$")


@pytest.fixture(scope="module")
def manifests(repo_root) -> dict[str, list[dict]]:
    directory = repo_root / "deploy" / "k8s"
    found = {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(directory.glob("*.yaml"))}
    assert found
    return found


def one(manifests, kind: str) -> dict:
    (doc,) = [d for docs in manifests.values() for d in docs if d["kind"] == kind]
    return doc


def container_of(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def probe_paths(container: dict) -> dict[str, str]:
    return {name: container[name]["httpGet"]["path"] for name in ("startupProbe", "readinessProbe", "livenessProbe")
            if name in container}


def test_every_manifest_has_api_version_kind_and_name(manifests):
    kinds = set()
    for name, docs in manifests.items():
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind"), name
            kinds.add(doc["kind"])
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"], name
    assert kinds >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ServiceMonitor", "InferenceService"}


def test_deployment_probes_resources_and_scrape_annotations(manifests, app_paths):
    deployment = one(manifests, "Deployment")
    container = container_of(deployment)
    paths = probe_paths(container)
    assert paths["livenessProbe"] == "/v2/health/live"
    assert paths["readinessProbe"] == "/v2/health/ready"
    for path in paths.values():
        assert "GET" in app_paths[path], path
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001}
    for name in paths:
        assert container[name]["httpGet"]["port"] in ("http", 8000)
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}
        assert all(K8S_QUANTITY.match(str(v)) for v in container["resources"][kind].values())
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["http"]
    assert annotations["prometheus.io/path"] == "/metrics" and "GET" in app_paths["/metrics"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"][
        "labels"].items()


def test_deployment_runs_the_image_cmd_as_its_non_root_user(manifests, dockerfile):
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    container = container_of(one(manifests, "Deployment"))
    assert "command" not in container and "args" not in container  # the image's CMD, the tested one
    assert pod["securityContext"]["runAsNonRoot"] is True
    uid = re.search(r"useradd .*--uid (\d+)", " ".join(dockerfile.stage("base").all("RUN"))).group(1)
    assert pod["securityContext"]["runAsUser"] == int(uid) != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_termination_grace_period_covers_shutdown_delay_and_drain(manifests):
    deployment = one(manifests, "Deployment")
    container = container_of(deployment)
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    drain = float(env.get("CONVSERVE_DRAIN_SECONDS", 20))
    delay = float(env["CONVSERVE_SHUTDOWN_DELAY_SECONDS"])  # endpoints are removed a few seconds after SIGTERM
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert delay > 0
    assert grace > delay + drain, (grace, delay, drain)
    # The readiness probe notices a terminating pod before the drain ends.
    readiness = container["readinessProbe"]
    assert readiness["periodSeconds"] * readiness.get("failureThreshold", 3) < drain


def test_environment_is_service_settings(manifests, settings_env_names):
    for name, docs in manifests.items():
        for doc in docs:
            for container in _containers(doc):
                names = {e["name"] for e in container.get("env", [])} - {"STORAGE_URI"}
                assert names <= settings_env_names, (name, names - settings_env_names)


def _containers(doc: dict) -> list[dict]:
    if doc["kind"] == "Deployment":
        return doc["spec"]["template"]["spec"]["containers"]
    if doc["kind"] == "InferenceService":
        return doc["spec"]["predictor"].get("containers", [])
    return []


def test_service_selects_the_pods_and_targets_the_named_port(manifests):
    deployment, service = one(manifests, "Deployment"), one(manifests, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    named = {p["name"]: p["containerPort"] for p in container_of(deployment)["ports"]}
    assert {(p["name"], p["targetPort"], p["port"]) for p in service["spec"]["ports"]} \
        == {("http", "http", 8000), ("grpc", "grpc", 8001)}
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(named)


def test_hpa_scales_the_deployment_on_cpu(manifests):
    hpa, deployment = one(manifests, "HorizontalPodAutoscaler"), one(manifests, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment",
                                                                      deployment["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "cpu" in container_of(deployment)["resources"]["requests"]  # utilisation is relative to it


def test_service_monitor_scrapes_the_service_port(manifests, app_paths):
    monitor, service = one(manifests, "ServiceMonitor"), one(manifests, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] in app_paths


def test_kustomization_lists_existing_files(manifests, repo_root):
    kustomization = one(manifests, "Kustomization")
    for resource in kustomization["resources"]:
        assert (repo_root / "deploy" / "k8s" / resource).is_file(), resource


def test_kserve_triton_serves_the_onnx_model_repository(manifests, repo_root):
    (triton,) = [d for d in manifests["kserve-triton.yaml"]]
    assert (triton["apiVersion"], triton["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    model = triton["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "onnx" and "triton" in model["runtime"]
    assert model["protocolVersion"] == "v2"
    assert re.match(r"^(gs|s3|pvc|https?)://", model["storageUri"])
    # What makes models/ a Triton repository (and a TF Serving base path per model).
    # (A model a training run is publishing right now has no config.pbtxt for a moment: skipped.)
    models = [p for p in (repo_root / "models").iterdir() if (p / "config.pbtxt").is_file()]
    assert "mnist" in {p.name for p in models}
    for directory in models:
        config = (directory / "config.pbtxt").read_text()
        assert re.search(r'^backend: "onnxruntime"$', config, re.M), directory.name
        assert re.search(rf'^name: "{re.escape(directory.name)}"$', config, re.M), directory.name
        versions = [v for v in directory.iterdir() if v.is_dir() and v.name.isdigit()]
        assert versions, directory.name
        for version in versions:
            assert (version / "model.onnx").is_file(), version
            assert (version / "saved_model.pb").is_file() and (version / "variables").is_dir(), version


def test_kserve_custom_container_runs_our_command(manifests, container_command, app_paths):
    (custom,) = [d for d in manifests["kserve-custom.yaml"]]
    (container,) = custom["spec"]["predictor"]["containers"]
    command = container["command"]
    assert [a for i, a in enumerate(command) if i == 0 or not command[i - 1] == "--models-dir"] == \
        [a for i, a in enumerate(container_command) if i == 0 or not container_command[i - 1] == "--models-dir"]
    assert command[command.index("--models-dir") + 1] == "/mnt/models"  # KServe's storage initializer
    assert container["ports"][0]["containerPort"] == int(command[command.index("--port") + 1])
    for path in probe_paths(container).values():
        assert "GET" in app_paths[path]


def test_k8s_files_are_only_yaml(repo_root):
    assert {p.suffix for p in Path(repo_root / "deploy" / "k8s").iterdir()} == {".yaml"}


def test_replicas_share_a_postgresql_state_store_named_by_a_secret(manifests):
    deployment = one(manifests, "Deployment")
    assert deployment["spec"]["replicas"] > 1
    (state,) = [e for e in container_of(deployment)["env"] if e["name"] == "CONVSERVE_STATE_URL"]
    ref = state["valueFrom"]["secretKeyRef"]
    secret = one(manifests, "Secret")
    assert secret["metadata"]["name"] == ref["name"]
    assert secret["stringData"][ref["key"]].startswith("postgresql://")  # not a SQLite file per pod
