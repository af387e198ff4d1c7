"""Multi-worker training: two real worker processes on loopback ports train together and the chief alone
publishes; a malformed TF_CONFIG or an unreachable peer is one ``error:`` line and exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.server import free_port
from tests.training.conftest import LIMIT
from tests.training.test_train_export import MAX_STEPS, REPO_ROOT
from training import export
from training.cluster import Cluster, ClusterError, parse_tf_config
from training.recipes import get_recipe

WORKERS = 2
CLUSTER_TIMEOUT = 5  # seconds the unreachable-peer test waits for its missing peer


def tf_config(addresses: list[str], index: int, job: str = "worker") -> str:
    return json.dumps({"cluster": {job: addresses}, "task": {"type": job, "index": index}})


def start_worker(config: str, *args: object) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_CONFIG": config}
    return subprocess.Popen([sys.executable, "-m", "training", *map(str, args)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"worker still running after {timeout} s: {err[-2000:]}")
    return process.returncode, out, err


# --- Two workers, one publish --------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_workers(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("cluster")
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(WORKERS)]
    args = ("train", "--recipe", "mnist", "--epochs", "1", "--max-steps", MAX_STEPS, "--limit", LIMIT,
            "--data-dir", data_dir, "--models-dir", tmp / "models", "--runs-dir", tmp / "runs",
            "--cluster-timeout", "240")
    processes = [start_worker(tf_config(addresses, index), *args) for index in range(WORKERS)]
    results = [finish(process, timeout=480) for process in processes]
    return {"results": results, "models": tmp / "models", "runs": tmp / "runs"}


def test_both_workers_exit_0(two_workers):
    for returncode, _, err in two_workers["results"]:
        assert returncode == 0, err[-3000:]


def test_only_the_chief_publishes_exactly_one_version(two_workers):
    (chief_out, worker_out) = (out for _, out, _ in two_workers["results"])
    version = two_workers["models"] / "mnist" / "1"
    assert f"exported {version} " in chief_out
    assert worker_out.strip().splitlines()[-1] == \
        "worker 1 finished training; the chief evaluates, exports and publishes"
    assert sorted(p.name for p in (two_workers["models"] / "mnist").iterdir()) == ["1", "config.pbtxt", "labels.txt"]


def test_only_the_chief_writes_a_run_directory(two_workers):
    (run,) = (two_workers["runs"] / "mnist").iterdir()
    for name in ("last.keras", "best.keras", "history.json", "state.json", "tensorboard"):
        assert (run / name).exists(), name
    state = json.loads((run / "state.json").read_text())
    assert state["workers"] == WORKERS and state["epochs_done"] == 1


def test_the_published_version_passes_the_parity_check_and_records_the_cluster(two_workers):
    version = two_workers["models"] / "mnist" / "1"
    metadata = json.loads((version / "metadata.json").read_text())
    assert metadata["parity"]["onnx_max_abs_diff"] <= export.PARITY_TOLERANCE
    assert metadata["parity"]["saved_model_max_abs_diff"] <= export.PARITY_TOLERANCE
    batch = get_recipe("mnist").batch_size
    training = metadata["training"]
    assert training["strategy"] == "MultiWorkerMirroredStrategy"
    assert training["workers"] == WORKERS and training["global_batch_size"] == batch * WORKERS
    report = (version / "report" / "report.md").read_text()
    assert f"| workers | {WORKERS} (global batch {batch * WORKERS} = {batch} per worker x {WORKERS}) |" in report


# --- TF_CONFIG problems ---------------------------------------------------------------------------

@pytest.mark.parametrize(("config", "message"), [
    ('{"cluster": ', "TF_CONFIG is not valid JSON: Expecting value: line 1 column 13 (char 12)"),
    ('["worker"]', 'TF_CONFIG must be a JSON object with "cluster" and "task"'),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}}', 'TF_CONFIG has a cluster but no "task": {"type": ..., "index": ...}'),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 1}}',
     "TF_CONFIG's task index 1 is out of range for the 1 worker task(s)"),
    ('{"cluster": {"worker": ["127.0.0.1"]}, "task": {"type": "worker", "index": 0}}',
     "TF_CONFIG's cluster job 'worker' must be a non-empty list of host:port addresses, got [\"127.0.0.1\"]"),
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}',
     "TF_CONFIG's cluster has a 'ps' job; MultiWorkerMirroredStrategy trains with chief and worker tasks only"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}',
     "TF_CONFIG's task type 'chief' is not a job of its cluster (worker)"),
])
def test_a_malformed_tf_config_is_one_error_line_and_exit_2(config, message, tmp_path):
    started = time.monotonic()
    process = start_worker(config, "train", "--recipe", "mnist", "--models-dir", tmp_path / "models",
                           "--runs-dir", tmp_path / "runs")
    returncode, _, err = finish(process, timeout=120)
    assert returncode == 2, err[-2000:]
    assert err.strip().splitlines()[-1] == f"error: {message}"
    assert "Traceback" not in err
    assert not (tmp_path / "models").exists() and not (tmp_path / "runs").exists()
    assert time.monotonic() - started < 120


def test_an_unreachable_peer_is_one_error_line_and_exit_2_within_the_timeout(data_dir, tmp_path):
    addresses = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]  # nobody listens on the second
    process = start_worker(tf_config(addresses, 0), "train", "--recipe", "mnist", "--epochs", "1", "--limit", LIMIT,
                           "--data-dir", data_dir, "--models-dir", tmp_path / "models", "--runs-dir",
                           tmp_path / "runs", "--cluster-timeout", CLUSTER_TIMEOUT)
    returncode, _, err = finish(process, timeout=180)
    assert returncode == 2, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        f"error: the training cluster did not form within {CLUSTER_TIMEOUT} s: worker 0 could not reach every "
        f"peer ({', '.join(addresses)}); check that every task is started with the same TF_CONFIG and that the "
        "addresses are reachable")
    assert not (tmp_path / "models" / "mnist").exists()


# --- Which task is the chief ----------------------------------------------------------------------

def test_no_tf_config_or_no_cluster_means_a_single_process():
    assert parse_tf_config(None) is None
    assert parse_tf_config("") is None
    assert parse_tf_config('{"task": {"type": "worker", "index": 0}}') is None


def test_worker_0_is_the_chief_unless_the_cluster_has_a_chief_task():
    workers = {"worker": ["a:1", "b:1"]}
    assert parse_tf_config(tf_config(workers["worker"], 0)) == Cluster(workers, "worker", 0)
    assert parse_tf_config(tf_config(workers["worker"], 0)).is_chief
    assert not parse_tf_config(tf_config(workers["worker"], 1)).is_chief
    with_chief = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    chief = parse_tf_config(json.dumps({"cluster": with_chief, "task": {"type": "chief", "index": 0}}))
    worker0 = parse_tf_config(json.dumps({"cluster": with_chief, "task": {"type": "worker", "index": 0}}))
    assert chief.is_chief and not worker0.is_chief
    assert chief.workers == 3


def test_two_chiefs_are_refused():
    with pytest.raises(ClusterError, match="at most one chief"):
        parse_tf_config(json.dumps({"cluster": {"chief": ["a:1", "b:1"]}, "task": {"type": "chief", "index": 0}}))
