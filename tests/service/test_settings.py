"""Settings: safe defaults, CONVSERVE_ environment variables, CLI flags on top (the inference-thread default:
test_inference_threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.__main__ import parse_args
from service.settings import Settings, available_cpus


def test_defaults_are_safe():
    settings = Settings(_env_file=None)
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.admin_token is None
    assert settings.runtime == "onnx"


def test_environment_variables_use_the_prefix(monkeypatch):
    monkeypatch.setenv("CONVSERVE_MODELS_DIR", "/srv/models")
    monkeypatch.setenv("CONVSERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("CONVSERVE_ADMIN_TOKEN", "s3cret")
    settings = Settings()
    assert settings.models_dir == Path("/srv/models")
    assert settings.max_batch_size == 7
    assert settings.admin_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


def test_cli_flags_parse_to_overrides():
    args = parse_args(["--models-dir", "m", "--host", "0.0.0.0", "--port", "9000"])
    assert (args.models_dir, args.host, args.port) == (Path("m"), "0.0.0.0", 9000)
    assert parse_args([]).port is None  # unset flags leave the environment's values alone


@pytest.mark.parametrize("policy", ["latest:1", "latest:3", "all", "specific:1,3", "specific: 2"])
def test_version_policy_accepts_the_three_forms(monkeypatch, policy):
    monkeypatch.setenv("CONVSERVE_VERSION_POLICY", policy)
    assert Settings().version_policy == policy.replace(" ", "")


@pytest.mark.parametrize("policy", ["bogus", "latest", "latest:0", "latest:-1", "specific:", "specific:a", "al"])
def test_version_policy_rejects_anything_else(monkeypatch, policy):
    monkeypatch.setenv("CONVSERVE_VERSION_POLICY", policy)
    with pytest.raises(ValidationError, match=f"CONVSERVE_VERSION_POLICY='{policy}' is not a version policy"):
        Settings()


def test_service_refuses_to_start_with_an_unknown_version_policy(tmp_path):
    result = subprocess.run([sys.executable, "-m", "service", "--models-dir", str(tmp_path), "--port", "0"],
                            env={**os.environ, "CONVSERVE_VERSION_POLICY": "bogus"}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [  # one line, no traceback
        "error: invalid settings: CONVSERVE_VERSION_POLICY: CONVSERVE_VERSION_POLICY='bogus' is not a version "
        "policy: use latest:N (N >= 1), all, or specific:V1,V2,..."]


def test_workers_default_to_the_usable_cpus_and_share_them_with_inference_threads(monkeypatch):
    settings = Settings(_env_file=None)
    assert settings.workers == "auto" and settings.worker_count == available_cpus()
    assert settings.worker_count * settings.inference_threads <= max(available_cpus(), settings.worker_count)
    monkeypatch.setenv("CONVSERVE_WORKERS", "1")
    one = Settings()
    assert one.worker_count == 1 and one.inference_threads == max(1, available_cpus() // 2)
    monkeypatch.setenv("CONVSERVE_INFERENCE_THREADS", "3")
    assert Settings().inference_threads == 3  # an explicit count wins


def test_workers_must_be_auto_or_positive():
    for bad in ("0", "-1", "many"):
        with pytest.raises(ValidationError):
            Settings(workers=bad)
    assert parse_args(["--workers", "4"]).workers == "4"
    assert Settings(workers=parse_args(["--workers", "4"]).workers).worker_count == 4


def test_shutdown_delay_is_off_by_default(monkeypatch):
    assert Settings().shutdown_delay_seconds == 0
    monkeypatch.setenv("CONVSERVE_SHUTDOWN_DELAY_SECONDS", "5")
    assert Settings().shutdown_delay_seconds == 5


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("CONVSERVE_LOG_LEVEL", "bogus", "CONVSERVE_LOG_LEVEL: 'bogus' is not a log level"),
    ("CONVSERVE_WORKERS", "0", "CONVSERVE_WORKERS: 0 is not a worker count"),
    ("CONVSERVE_QUEUE_TARGET_MS", "fast", "CONVSERVE_QUEUE_TARGET_MS: "),
    ("CONVSERVE_KEEP_INPUTS", "2", "CONVSERVE_KEEP_INPUTS: Input should be less than or equal to 1"),
])
def test_an_unusable_value_stops_the_start_with_one_line_naming_the_setting(tmp_path, variable, value, expected):
    result = subprocess.run([sys.executable, "-m", "service", "--models-dir", str(tmp_path), "--port", "0"],
                            env={**os.environ, variable: value}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith(f"error: invalid settings: {expected}"), line
    assert "CONSTRAINED" not in line and "CONVSERVE_:" not in line


def start_service(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m service`` with ``args``, run to its end (a start that is refused ends at once)."""
    return subprocess.run([sys.executable, "-m", "service", "--port", "0", *args], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("via", ["flag", "environment"])
def test_a_models_dir_that_does_not_exist_stops_the_start_naming_the_setting_and_the_path(tmp_path, via):
    missing = tmp_path / "nonexistent"
    result = (start_service("--models-dir", str(missing)) if via == "flag"
              else start_service(env={"CONVSERVE_MODELS_DIR": str(missing)}))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [  # one line, no traceback
        f"error: invalid settings: CONVSERVE_MODELS_DIR: {missing} does not exist"]


def test_a_models_dir_that_is_a_file_stops_the_start(tmp_path):
    (tmp_path / "models").write_text("")
    result = start_service("--models-dir", str(tmp_path / "models"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: invalid settings: CONVSERVE_MODELS_DIR: {tmp_path / 'models'} is not a directory"]


def test_the_tensorflow_runtime_without_an_importable_tensorflow_stops_the_start(tmp_path):
    # A tensorflow package ahead of the installed one, failing to import as a missing or broken install does.
    (tmp_path / "shadow" / "tensorflow").mkdir(parents=True)
    (tmp_path / "shadow" / "tensorflow" / "__init__.py").write_text('raise ImportError("no TensorFlow here")\n')
    result = start_service("--models-dir", str(tmp_path), "--runtime", "tensorflow",
                           env={"PYTHONPATH": str(tmp_path / "shadow")})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: CONVSERVE_RUNTIME=tensorflow: tensorflow cannot be imported (ImportError: no TensorFlow here); "
        "install the [tf] extra or use CONVSERVE_RUNTIME=onnx"]


def test_a_state_store_written_by_a_newer_convserve_stops_the_start(tmp_path):
    from service.state.store import SCHEMA_VERSION, StateStore, schema_table

    url = f"sqlite:///{tmp_path}/state.sqlite"
    store = StateStore(url)
    store.open()
    with store.engine.begin() as conn:
        conn.execute(schema_table.update().values(version=SCHEMA_VERSION + 1))
    result = subprocess.run([sys.executable, "-m", "service", "--models-dir", str(tmp_path), "--port", "0"],
                            env={**os.environ, "CONVSERVE_STATE_URL": url}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: CONVSERVE_STATE_URL: the state store") and "newer convserve" in line
