"""Settings: safe defaults, CONVSERVE_ environment variables, CLI flags on top."""

from __future__ import annotations

from pathlib import Path

from service.__main__ import parse_args
from service.settings import Settings, available_cpus


def test_defaults_are_safe():
    settings = Settings(_env_file=None)
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.admin_token is None
    assert settings.runtime == "onnx"
    assert 1 <= settings.inference_threads <= available_cpus()


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
