"""deploy/k8s/training-tfjob.yaml, checked statically like the serving manifests: the TFJob runs the training
CLI with arguments it accepts, as the image's user, on several workers, writing into the models volume."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from training.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFEST = REPO_ROOT / "deploy" / "k8s" / "training-tfjob.yaml"


@pytest.fixture(scope="module")
def documents() -> dict[str, dict]:
    return {doc["kind"] + "/" + doc["metadata"]["name"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}


@pytest.fixture(scope="module")
def tfjob(documents) -> dict:
    (job,) = [doc for doc in documents.values() if doc["kind"] == "TFJob"]
    return job


@pytest.fixture(scope="module")
def worker_pod(tfjob) -> dict:
    return tfjob["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]


def test_the_job_is_a_kubeflow_tfjob_of_several_workers_without_a_parameter_server(tfjob):
    assert tfjob["apiVersion"] == "kubeflow.org/v1"
    specs = tfjob["spec"]["tfReplicaSpecs"]
    assert set(specs) <= {"Chief", "Worker"}  # MultiWorkerMirroredStrategy: no PS, no evaluator
    assert specs["Worker"]["replicas"] >= 2
    assert tfjob["spec"]["runPolicy"]["backoffLimit"] == 0  # a refused model (exit 3) is not retrained


def test_the_container_runs_the_training_cli_with_arguments_it_accepts(worker_pod):
    (container,) = worker_pod["containers"]
    assert container["name"] == "tensorflow"  # the Training Operator's default container name
    assert container["image"].startswith("convserve-train:")
    args = build_parser().parse_args(container["args"])
    assert args.command == "train" and args.cluster_timeout > 0
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert str(args.models_dir) == mounts["models"] and str(args.runs_dir) == mounts["runs"]


def test_the_models_volume_is_a_shared_claim_defined_beside_the_job(worker_pod, documents):
    volumes = {v["name"]: v for v in worker_pod["volumes"]}
    for name in ("models", "runs"):
        claim = volumes[name]["persistentVolumeClaim"]["claimName"]
        pvc = documents[f"PersistentVolumeClaim/{claim}"]
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], claim


def test_the_workers_run_as_the_images_user(worker_pod):
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    security = worker_pod["securityContext"]
    assert f"--uid {security['runAsUser']}" in dockerfile
    assert security["fsGroup"] == security["runAsGroup"] == security["runAsUser"]
