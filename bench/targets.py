"""The servers the benchmark compares: convserve in several configurations, and the three peers.

convserve is pointed at a temporary model repository that links to models/mnist/1 (nothing is
written under models/). Without a config.pbtxt there, the ``CONVSERVE_MAX_BATCH_SIZE`` and
``CONVSERVE_MAX_QUEUE_DELAY_US`` settings of the grid apply; the "as shipped" repository links the
whole bundled model directory, config.pbtxt included, and its label says what that file sets for batching.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from bench.servers import ServerSpec
from service.model_config import read_model_config

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "mnist"
BENTO_VENV = ROOT / "bench" / ".venv-bentoml"


@cache
def shipped_batching(model_dir: Path = MODEL_DIR) -> str:
    """What the bundled config.pbtxt sets for batching, read from the file: ``b64, no delay`` or ``b64/500us``.

    No delay in the file means ``CONVSERVE_MAX_QUEUE_DELAY_US`` (default 0) applies, as for the grid's rows.
    """
    config = read_model_config(model_dir)
    if config is None:
        return "no config.pbtxt"
    size = f"b{config.max_batch_size}" if config.max_batch_size else "no batch limit"
    delay = config.dynamic_batching.max_queue_delay_microseconds if config.HasField("dynamic_batching") else 0
    return f"{size}/{delay}us" if delay else f"{size}, no delay"


@dataclass(frozen=True)
class OursConfig:
    """One convserve configuration: batching on or off, and for on, max batch size and queue delay."""

    batching: bool
    max_batch_size: int = 32
    max_queue_delay_us: int = 0
    shipped: bool = False
    """Bundled config.pbtxt and every default (access log on, repository polling) instead of the grid's."""

    @property
    def label(self) -> str:
        if self.shipped:
            return f"ours as shipped (config.pbtxt {shipped_batching()}, access log on)"
        if not self.batching:
            return "ours batching off"
        return f"ours batching b{self.max_batch_size}/{self.max_queue_delay_us}us"


def model_repositories(tmp: Path) -> tuple[Path, Path]:
    """Two repositories in ``tmp``: plain (version 1 only, no config.pbtxt) and shipped (the bundled dir)."""
    plain, shipped = tmp / "repo-plain", tmp / "repo-shipped"
    (plain / "mnist").mkdir(parents=True)
    (plain / "mnist" / "1").symlink_to(MODEL_DIR / "1", target_is_directory=True)
    shipped.mkdir()
    (shipped / "mnist").symlink_to(MODEL_DIR, target_is_directory=True)
    return plain, shipped


def ours(config: OursConfig, repositories: tuple[Path, Path], threads: int,
         extra_env: dict[str, str] | None = None) -> ServerSpec:
    """``python -m service`` with ``config`` as CONVSERVE_* variables."""
    plain, shipped = repositories
    env = {"CONVSERVE_INFERENCE_THREADS": str(threads)}
    if not config.shipped:
        env.update(CONVSERVE_BATCHING=str(config.batching).lower(), CONVSERVE_MAX_BATCH_SIZE=str(config.max_batch_size),
                   CONVSERVE_MAX_QUEUE_DELAY_US=str(config.max_queue_delay_us), CONVSERVE_ACCESS_LOG="false",
                   CONVSERVE_REPOSITORY_POLL_SECONDS="0", CONVSERVE_LOG_LEVEL="warning")
    env.update(extra_env or {})
    repository = shipped if config.shipped else plain
    return ServerSpec(
        name=config.label,
        command=[sys.executable, "-m", "service", "--models-dir", str(repository), "--host", "127.0.0.1",
                 "--port", "{port}"],
        ready_path="/v2/health/ready", predict_path="/models/mnist/predict", env=env)


def service_defaults(name: str, repository: Path, state: Path, env: dict[str, str] | None = None,
                     core: str | None = None) -> ServerSpec:
    """``python -m service`` on its defaults but for a state store of its own (``state``, a SQLite file), gRPC off
    (several run at once; the figures compare HTTP) and ``env``; with ``core``, pinned to that CPU with ``taskset``."""
    command = [sys.executable, "-m", "service", "--models-dir", str(repository), "--host", "127.0.0.1",
               "--port", "{port}"]
    return ServerSpec(
        name=name, command=(["taskset", "-c", core] if core else []) + command,
        ready_path="/v2/health/ready", predict_path="/models/mnist/predict",
        env={"CONVSERVE_STATE_URL": f"sqlite:///{state}", "CONVSERVE_GRPC_PORT": "0", **(env or {})})


def _uvicorn_app(name: str, app: str, threads: int, start_timeout_s: float = 60.0,
                 env: dict[str, str] | None = None, workers: int = 1) -> ServerSpec:
    return ServerSpec(
        name=name,
        command=[sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", "{port}",
                 "--no-access-log", "--log-level", "warning", "--workers", str(workers)],
        ready_path="/openapi.json", predict_path="/predict", start_timeout_s=start_timeout_s,
        env={"THREADS": str(threads), "MODEL": str(MODEL_DIR / "1" / "model.onnx"),
             "MODEL_DIR": str(MODEL_DIR / "1"), **(env or {})})


def inline_app(threads: int) -> ServerSpec:
    """Peer (a): FastAPI + Pillow + ``session.run`` inline."""
    return _uvicorn_app("peer a: inline onnx app", "bench.peers.inline_onnx_app:app", threads)


def keras_app(threads: int) -> ServerSpec:
    """Peer (b): the same app with Keras ``model.predict`` on the SavedModel."""
    return _uvicorn_app("peer b: keras predict app", "bench.peers.keras_predict_app:app", threads,
                        start_timeout_s=180.0, env={"TF_CPP_MIN_LOG_LEVEL": "2"})


def bento_service(threads: int, home: Path) -> ServerSpec:
    """Peer (c): BentoML from its own venv; ``home`` keeps its store out of the user's ~/bentoml."""
    return ServerSpec(
        name="peer c: bentoml",
        command=[str(BENTO_VENV / "bin" / "bentoml"), "serve", "bench.peers.bento_service:MnistOnnx",
                 "--host", "127.0.0.1", "--port", "{port}"],
        ready_path="/readyz", predict_path="/predict", start_timeout_s=120.0,
        env={"THREADS": str(threads), "MODEL": str(MODEL_DIR / "1" / "model.onnx"), "BENTOML_HOME": str(home),
             "BENTOML_DO_NOT_TRACK": "true"})


def ensure_bento_venv(timeout_s: float) -> tuple[bool, str]:
    """Create bench/.venv-bentoml with BentoML, onnxruntime and Pillow unless it exists.

    Returns (usable, what happened). A separate venv, so that BentoML's pins cannot change the project's.
    """
    bentoml = BENTO_VENV / "bin" / "bentoml"
    python = BENTO_VENV / "bin" / "python"
    if bentoml.exists():
        return True, f"bentoml {_bento_version(python)} (existing {BENTO_VENV.relative_to(ROOT)})"
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(BENTO_VENV)], check=True, capture_output=True,
                       timeout=120)
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", "bentoml", "onnxruntime", "pillow", "numpy"],
                              capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    except subprocess.TimeoutExpired:
        return False, f"pip install bentoml did not finish within {timeout_s:.0f} s"
    except (OSError, subprocess.CalledProcessError) as exc:
        return False, f"could not create {BENTO_VENV.name}: {exc}"
    if done.returncode != 0 or not bentoml.exists():
        errors = [line for line in done.stderr.splitlines() if "ERROR" in line] or done.stderr.splitlines()[-3:]
        return False, "pip install bentoml failed: " + " | ".join(errors)[:500]
    return True, f"bentoml {_bento_version(python)} (installed into {BENTO_VENV.relative_to(ROOT)})"


def _bento_version(python: Path) -> str:
    try:
        done = subprocess.run([str(python), "-c", "import bentoml; print(bentoml.__version__)"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return done.stdout.strip() or "?"
