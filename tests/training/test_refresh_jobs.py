"""The refresh as a job: the compose profile and the Kubernetes CronJob run ``python -m training refresh`` with
arguments it accepts, on the api's state store and models volume, and the CronJob's wrapper really turns the
"nothing published" statuses (3, 4) into success and keeps every other failure a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from service.state.log import encoded_input
from service.state.store import Label, Record, StateStore
from training.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parents[2]
CRONJOB = REPO_ROOT / "deploy" / "k8s" / "refresh-cronjob.yaml"


@pytest.fixture(scope="module")
def cronjob() -> dict:
    (job,) = yaml.safe_load_all(CRONJOB.read_text())
    return job


@pytest.fixture(scope="module")
def container(cronjob) -> dict:
    (c,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return c


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]


def test_the_cronjob_refreshes_with_arguments_the_cli_accepts(cronjob, container) -> None:
    assert cronjob["apiVersion"] == "batch/v1" and cronjob["kind"] == "CronJob"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    args = build_parser().parse_args(["refresh", *container["args"]])
    assert args.command == "refresh" and args.model == "mnist" and args.since == "30d"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert str(args.models_dir) == mounts["models"] and str(args.runs_dir) == mounts["runs"]
    assert container["image"].startswith("convserve-train:")


def test_the_cronjob_reads_the_deployments_state_store_secret(container) -> None:
    deployment = yaml.safe_load((REPO_ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    (api,) = deployment["spec"]["template"]["spec"]["containers"]
    source = {e["name"]: e.get("valueFrom") for e in api["env"]}["CONVSERVE_STATE_URL"]
    assert {e["name"]: e.get("valueFrom") for e in container["env"]}["CONVSERVE_STATE_URL"] == source


def test_the_cronjob_uses_the_claims_the_training_job_defines(cronjob) -> None:
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    defined = {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all(
        (REPO_ROOT / "deploy" / "k8s" / "training-tfjob.yaml").read_text()) if doc["kind"] == "PersistentVolumeClaim"}
    for claim in claims.values():
        assert defined[claim]["spec"]["accessModes"] == ["ReadWriteMany"]
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert f"--uid {pod['securityContext']['runAsUser']}" in dockerfile


def run_wrapper(container: dict, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The CronJob's command as the pod runs it, with this interpreter as ``python``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([*container["command"], *args], cwd=REPO_ROOT, env=env, text=True, capture_output=True,
                          timeout=300)


def test_the_cronjob_wrapper_passes_nothing_published_and_fails_errors(container, tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "mnist").mkdir(parents=True)
    (models / "mnist" / "1").symlink_to(REPO_ROOT / "models" / "mnist" / "1", target_is_directory=True)
    url = f"sqlite:///{tmp_path}/state.sqlite"
    store = StateStore(url)
    store.open()
    data, dtype = encoded_input(np.zeros((28, 28, 1), np.float32))
    store.write([Record("mnist", "r0", 0, "1", 1.0, 0, 0.9, None, data, dtype, "28,28,1")])
    store.add_feedback("mnist", [Label("r0", 0, 3)])
    store.close()
    common = ["--model", "mnist", "--models-dir", str(models), "--runs-dir", str(tmp_path / "runs"),
              "--state-url", url]
    too_few = run_wrapper(container, common, tmp_path)  # 1 labelled prediction, 200 needed: exit 4 inside
    assert too_few.returncode == 0, too_few.stderr
    assert "nothing published (exit 4)" in too_few.stdout and "fewer than --min-labelled 200" in too_few.stderr
    broken = run_wrapper(container, [*common[:-1], f"sqlite:///{tmp_path}/missing.sqlite"], tmp_path)
    assert broken.returncode == 2 and "does not exist" in broken.stderr


def test_the_compose_profile_shares_the_apis_store_and_models(compose) -> None:
    api, refresh = compose["api"], compose["refresh"]
    assert refresh["profiles"] == ["refresh"] and refresh["build"]["target"] == "train"
    assert refresh["environment"]["CONVSERVE_STATE_URL"] == api["environment"]["CONVSERVE_STATE_URL"]
    args = build_parser().parse_args(refresh["command"])
    mounts = {v.split(":")[1]: v.split(":")[0] for v in refresh["volumes"]}
    api_mounts = {v.split(":")[1]: v.split(":")[0] for v in api["volumes"]}
    assert mounts[str(args.models_dir)] == api_mounts["/models"]  # writes where the api reads
    assert not refresh["volumes"][0].endswith(":ro")
    store_dir = "/var/lib/convserve"
    assert api["environment"]["CONVSERVE_STATE_URL"].endswith(f"{store_dir}/convserve.sqlite}}")
    assert mounts[store_dir] == api_mounts[store_dir] == "state"
