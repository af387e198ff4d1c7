"""The inference-thread default: half the CPUs this process may use (its affinity mask, capped by a cgroup v2 CPU
quota) shared among the worker processes, at least one, and that number reaches ONNX Runtime as its intra-op
thread count.

The CPUs and the quota are made up (the affinity call and the cgroup file are replaced), and ONNX Runtime's
session class is wrapped to record the options the service gives it."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

import service.settings
from service.app import create_app
from service.settings import Settings
from tests.support.models import write_digit_version

CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


@pytest.fixture()
def machine(monkeypatch, tmp_path):
    """``machine(cpus, quota)``: this process may use ``cpus`` CPUs; ``quota`` is cpu.max's content (None: no
    cgroup file)."""

    def set_up(cpus: int, quota: str | None) -> None:
        monkeypatch.setattr(service.settings.os, "sched_getaffinity", lambda pid: set(range(cpus)))
        cpu_max = tmp_path / "cpu.max"
        if quota is not None:
            cpu_max.write_text(quota + "\n")
        real_path = Path
        monkeypatch.setattr(service.settings, "Path",
                            lambda p, *rest: cpu_max if str(p) == CGROUP_CPU_MAX else real_path(p, *rest))

    return set_up


@pytest.fixture()
def intra_op_threads(monkeypatch) -> list[int]:
    """The intra-op thread count of every ONNX Runtime session created from now on."""
    seen: list[int] = []

    class RecordingSession(ort.InferenceSession):
        def __init__(self, path, sess_options=None, *args, **kwargs):
            seen.append(sess_options.intra_op_num_threads if sess_options is not None else 0)
            super().__init__(path, sess_options, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", RecordingSession)
    return seen


def serve(models_dir: Path) -> None:
    """Start an app on ``models_dir`` with no thread count given, and see its model ready."""
    with TestClient(create_app(Settings(models_dir=models_dir, access_log=False))) as client:
        assert client.get("/v2/models/m/ready").status_code == 200


@pytest.mark.parametrize(("cpus", "quota", "workers", "expected"), [
    (8, None, "1", 4),                 # one process, no cgroup file: half the affinity mask
    (8, "max 100000", "1", 4),         # a cgroup without a quota
    (16, "600000 100000", "1", 3),     # a 6-CPU quota on a 16-CPU machine: half the quota
    (8, "150000 100000", "1", 1),      # 1.5 CPUs round down to one, half of it is still one
    (1, None, "1", 1),                 # never zero
    (16, None, "2", 4),                # two workers share the half: 4 threads each
    (16, "600000 100000", "2", 1),     # 6 CPUs, two workers: 6 // 4
    (8, None, "auto", 1),              # the default: a worker per CPU, one thread each
])
def test_default_is_half_the_usable_cpus_per_worker_and_reaches_onnx_runtime(cpus, quota, workers, expected, machine,
                                                                             intra_op_threads, monkeypatch, tmp_path):
    monkeypatch.delenv("CONVSERVE_INFERENCE_THREADS", raising=False)
    monkeypatch.setenv("CONVSERVE_WORKERS", workers)
    machine(cpus, quota)
    write_digit_version(tmp_path / "models", "m", 1)
    serve(tmp_path / "models")
    assert intra_op_threads == [expected]


def test_the_environment_overrides_the_default(machine, intra_op_threads, monkeypatch, tmp_path):
    machine(8, None)
    monkeypatch.setenv("CONVSERVE_INFERENCE_THREADS", "3")
    write_digit_version(tmp_path / "models", "m", 1)
    serve(tmp_path / "models")
    assert intra_op_threads == [3]


@pytest.mark.parametrize(("cpus", "workers", "setting", "on_loop"), [
    (2, "auto", "auto", True),     # a worker per CPU: no CPU for a thread to overlap with
    (2, "2", "auto", True),
    (4, "2", "auto", False),       # two CPUs per worker: the thread runs beside the event loop
    (2, "1", "auto", False),
    (1, "1", "auto", True),        # a one-CPU container
    (2, "auto", "false", False),   # the setting wins over the default
    (8, "1", "true", True),
])
def test_batches_run_on_the_event_loop_when_a_worker_has_one_cpu(cpus, workers, setting, on_loop, machine,
                                                                monkeypatch, tmp_path):
    monkeypatch.setenv("CONVSERVE_WORKERS", workers)
    monkeypatch.setenv("CONVSERVE_INFERENCE_ON_LOOP", setting)
    machine(cpus, None)
    write_digit_version(tmp_path / "models", "m", 1)
    app = create_app(Settings(models_dir=tmp_path / "models", access_log=False))
    with TestClient(app) as client:
        assert client.get("/v2/models/m/ready").status_code == 200
        assert app.state.dataplane.version("m").batcher.config.on_loop is on_loop
