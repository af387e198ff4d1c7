"""Fixtures for the deployment tests: the parsed Dockerfile, its serving command run as a real process,
tiny models, and the metric names the service exports.

The real-process fixtures start exactly the Dockerfile's serving CMD (``python -m service --models-dir ...
--host ... --port ...``), with ``python`` replaced by this interpreter and the flag values by test ones.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.support.missing import missing
from tests.support.models import write_digit_version
from tests.support.server import ServiceProcess, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_DATA = REPO_ROOT / "tests" / "data"
ARTIFACTS = REPO_ROOT / "test-artifacts"


# --- The Dockerfile ----------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for key, args in self.instructions if key == keyword]


@dataclass
class Dockerfile:
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    @property
    def default(self) -> Stage:
        """What ``docker build .`` builds: the last stage."""
        return self.stages[-1]


def parse_dockerfile(text: str) -> Dockerfile:
    """Instructions per stage, continuation lines joined and comments dropped (enough for these checks)."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # comment lines inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=parts[0]))
        elif stages:
            stages[-1].instructions.append((keyword, args))
    return Dockerfile(stages)


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) instruction argument; fails on the shell form."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def dockerfile() -> Dockerfile:
    return parse_dockerfile((REPO_ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="session")
def exec_form_args():
    """``exec_form_args('["a", "b"]') == ["a", "b"]``"""
    return exec_form


@pytest.fixture(scope="session")
def container_command(dockerfile: Dockerfile) -> list[str]:
    """The serving image's CMD: the one command line the container and these tests run."""
    cmds = dockerfile.default.all("CMD")
    assert len(cmds) == 1, "the serving stage needs exactly one CMD"
    return exec_form(cmds[0])


def flag_value(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} must appear once in {argv}"
    return argv[argv.index(flag) + 1]


def with_flags(argv: list[str], **values: str) -> list[str]:
    """argv with the values of ``--flag-name`` flags replaced (keyword ``flag_name``)."""
    out = list(argv)
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        flag_value(out, flag)
        out[out.index(flag) + 1] = value
    return out


@pytest.fixture(scope="session")
def replace_flags():
    return with_flags


# --- Real processes ----------------------------------------------------------------------------

def prometheus_package_binary(name: str) -> str:
    """The path of a binary from Debian's prometheus package, or a skip saying how to install it."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed (make system-deps installs the prometheus package)")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return prometheus_package_binary("promtool")


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    return prometheus_package_binary("prometheus")


@pytest.fixture(scope="session")
def get_free_port():
    return free_port


def container_argv(command: list[str], models_dir: Path, port: int) -> list[str]:
    """The container's CMD with this interpreter for ``python`` and test values for its flags."""
    assert command[0] == "python", command
    return [sys.executable, *with_flags(command[1:], models_dir=str(models_dir), host="127.0.0.1", port=str(port))]


@pytest.fixture()
def start_service(container_command: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """``start_service(models_dir, wait_for="ready", **env)``: the serving CMD as a real process, once
    /v2/health/<wait_for> answers 200; killed at the end if still running."""
    started: list[ServiceProcess] = []
    log_dir = tmp_path_factory.mktemp("logs")

    def start(models_dir: Path, wait_for: str = "ready", **env: str) -> ServiceProcess:
        port = free_port()
        service = ServiceProcess(models_dir, log_dir, {"CONVSERVE_ACCESS_LOG": "false", **env},
                                 argv=container_argv(container_command, models_dir, port), port=port,
                                 wait_for=f"/v2/health/{wait_for}")
        started.append(service)
        return service

    yield start
    for service in started:
        service.kill()


# --- Models ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny 28x28 digit model, ``digits`` version 1."""
    root = tmp_path_factory.mktemp("tiny-models")
    write_digit_version(root, "digits", 1)
    return root


@pytest.fixture(scope="session")
def repo_with_broken_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``digits``: version 1 serves, version 2 fails to load (both selected by its config.pbtxt)."""
    root = tmp_path_factory.mktemp("models-broken")
    write_digit_version(root, "digits", 1)
    broken = write_digit_version(root, "digits", 2, seed=2)
    (broken / "model.onnx").write_bytes(b"\x08\x01not an onnx model")
    (root / "digits" / "config.pbtxt").write_text("version_policy: { latest: { num_versions: 2 } }\n")
    return root


@pytest.fixture(scope="session")
def bundled_mnist_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the bundled, trained models/mnist/1 (ONNX + metadata), plus a version 2 whose model.onnx
    does not match its sha256, so both a working model and a load failure are there to observe."""
    source = REPO_ROOT / "models" / "mnist"
    if not (source / "1" / "model.onnx").is_file():
        missing("the bundled models/mnist/1 is not in this checkout")
    root = tmp_path_factory.mktemp("models-mnist")
    for version in ("1", "2"):
        (root / "mnist" / version).mkdir(parents=True)
        for name in ("model.onnx", "metadata.json"):
            shutil.copy(source / "1" / name, root / "mnist" / version / name)
    shutil.copy(source / "labels.txt", root / "mnist" / "labels.txt")
    (root / "mnist" / "2" / "model.onnx").write_bytes((source / "1" / "model.onnx").read_bytes()[:1000])
    config = re.sub(r"version_policy:.*\n", "", (source / "config.pbtxt").read_text())
    (root / "mnist" / "config.pbtxt").write_text(config + "version_policy: { latest: { num_versions: 2 } }\n")
    return root


@pytest.fixture(scope="session")
def mnist_pngs() -> list[bytes]:
    """Real MNIST test digits, committed as PNGs."""
    return [path.read_bytes() for path in sorted((TEST_DATA / "mnist").glob("*.png"))]


# --- What the service exports ------------------------------------------------------------------

def metric_names(exposition: str) -> set[str]:
    """Every series name in a Prometheus text exposition, plus the names of declared families that have no
    series yet (a labelled counter nobody incremented): histograms with their _bucket/_sum/_count."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.fixture(scope="session")
def exported_metrics(repo_with_broken_version: Path, mnist_pngs: list[bytes]) -> str:
    """/metrics of an in-process app after predictions through every protocol and one load failure."""
    settings = Settings(models_dir=repo_with_broken_version, access_log=False, inference_threads=1,
                        repository_poll_seconds=0)
    with TestClient(create_app(settings)) as client:
        files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(mnist_pngs[:4])]
        assert client.post("/models/digits/predict", files=files).status_code == 200
        tensor = {"inputs": [{"name": "image", "shape": [1, 28, 28, 1], "datatype": "FP32", "data": [0.0] * 784}]}
        assert client.post("/v2/models/digits/infer", json=tensor).status_code == 200
        return client.get("/metrics").text


@pytest.fixture(scope="session")
def exported_metric_names(exported_metrics: str) -> set[str]:
    return metric_names(exported_metrics)


@pytest.fixture(scope="session")
def app_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """The app's routes: path template -> HTTP methods (from its OpenAPI schema, plus /metrics)."""
    app = create_app(Settings(models_dir=tmp_path_factory.mktemp("empty"), access_log=False))
    return {path: {m.upper() for m in ops} for path, ops in app.openapi()["paths"].items()}


@pytest.fixture(scope="session")
def settings_env_names() -> set[str]:
    """Every environment variable the service reads: CONVSERVE_<FIELD>."""
    return {f"CONVSERVE_{name.upper()}" for name in Settings.model_fields}


# --- Grafana -----------------------------------------------------------------------------------

GRAFANA = REPO_ROOT / "deploy" / "grafana"


@pytest.fixture(scope="session")
def dashboard() -> dict:
    (path,) = (GRAFANA / "dashboards").glob("*.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query in the dashboard, the template variables' included."""
    queries = [(panel["title"], target["expr"]) for panel in dashboard["panels"]
               for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        queries.append((f"${variable['name']}", query))
    return queries


def promql_metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(convserve_[A-Za-z0-9_]+)\b", expr))


@pytest.fixture(scope="session")
def metric_names_in():
    """``metric_names_in(promql) -> {"convserve_...", ...}``"""
    return promql_metric_names


# --- Container steps ---------------------------------------------------------------------------

CONTAINER_STEPS = pytest.StashKey[list]()


class ContainerSteps:
    """The container tests' steps with their wall times (and notes such as image sizes): printed as they end,
    past pytest's output capture, appended to test-artifacts/containers.log, and listed again in the terminal
    summary, so a CI log shows where the minutes went."""

    def __init__(self, config: pytest.Config) -> None:
        self.lines: list[str] = config.stash.setdefault(CONTAINER_STEPS, [])
        self.capture = config.pluginmanager.getplugin("capturemanager")
        ARTIFACTS.mkdir(exist_ok=True)
        self.log = ARTIFACTS / "containers.log"
        with self.log.open("a") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}\n")

    def note(self, line: str) -> None:
        self.lines.append(line)
        with self.log.open("a") as log:
            log.write(line + "\n")
        with self.capture.global_and_fixture_disabled():
            print(f"\n[containers] {line}", flush=True)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        ok = False
        try:
            yield
            ok = True
        finally:
            self.note(f"{name}: {time.monotonic() - start:.1f} s{'' if ok else ' (failed)'}")


@pytest.fixture(scope="session")
def container_steps(pytestconfig: pytest.Config) -> ContainerSteps:
    return ContainerSteps(pytestconfig)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:  # noqa: ANN001 - pytest's hook
    lines = config.stash.get(CONTAINER_STEPS, [])
    if lines:
        terminalreporter.section("containers: steps, wall times, image sizes")
        for line in lines:
            terminalreporter.write_line(line)
