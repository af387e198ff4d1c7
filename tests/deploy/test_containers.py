"""Both Dockerfile targets built from this repository and run for real with a container engine.

Podman (daemonless; as root here, with runc) or Docker, whichever can run containers. No image registry is
needed: the Dockerfile's PYTHON_IMAGE is a Debian bookworm base that scripts/build-base-image.sh makes with
debootstrap and caches (CONVSERVE_PYTHON_IMAGE names another one). Skips with the reason where no engine
can run containers, except in CI (CI=true) on a machine where `make system-deps` could have installed one.

Each step's wall time and the image sizes are printed as they happen and in the terminal summary (and go to
test-artifacts/containers.log). The images stay behind: the engine's layer cache makes the next run fast.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy.test_deploy_static import compose
from tests.deploy.test_graceful_shutdown import BOUNDARY, slow_multipart
from tests.support.missing import missing

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_DATA = REPO_ROOT / "tests" / "data"
ARTIFACTS = REPO_ROOT / "test-artifacts"
SERVE_IMAGE = "localhost/convserve:containers-test"
TRAIN_IMAGE = "localhost/convserve-train:containers-test"
APP_UID = 10001

# Builds pip-install TensorFlow and ONNX Runtime from the package index: minutes, not the default 600 s.
pytestmark = pytest.mark.timeout(2400)


def could_install_system_packages() -> bool:
    """What scripts/install-system-deps.sh needs to install podman: apt-get, and root or passwordless sudo."""
    if shutil.which("apt-get") is None:
        return False
    if os.geteuid() == 0:
        return True
    sudo = shutil.which("sudo")
    return sudo is not None and subprocess.run([sudo, "-n", "true"], capture_output=True).returncode == 0


def skip_or_fail(reason: str) -> None:
    """The suite's one rule (tests/support/missing.py): skip on a developer's machine, fail under CI."""
    missing(reason)


def ulimit(kind: int, wanted: int) -> int:
    """No higher than the machine's own hard limit: a container cannot raise it (runc refuses to start)."""
    hard = resource.getrlimit(kind)[1]
    return wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)


@dataclass
class Engine:
    """A container engine's command line, with the options our machines need."""

    name: str
    path: str

    @property
    def ulimits(self) -> list[str]:
        nofile = ulimit(resource.RLIMIT_NOFILE, 20000)
        nproc = ulimit(resource.RLIMIT_NPROC, 4000)
        return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]

    def argv(self, *args: str) -> list[str]:
        # podman's default OCI runtime may be crun, which these machines lack; runc is the Debian package.
        runtime = ["--runtime", "runc"] if self.name == "podman" and shutil.which("runc") else []
        return [self.path, *runtime, *args]

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, f"{' '.join(args[:3])}...: {result.stderr[-3000:]}"
        return result

    def build(self, target: str, tag: str, base_image: str, log: Path) -> None:
        # Host networking for pip inside the build; podman keeps HEALTHCHECK only in Docker's image format.
        image_format = ["--format", "docker"] if self.name == "podman" else []
        argv = self.argv("build", "--network", "host", *self.ulimits, *image_format,
                         "--build-arg", f"PYTHON_IMAGE={base_image}", "--target", target, "-t", tag, str(REPO_ROOT))
        with log.open("w") as out:
            result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=2400)
        assert result.returncode == 0, f"building {target} failed; see {log}: {log.read_text()[-3000:]}"

    def size_mb(self, image: str) -> float:
        return int(self("image", "inspect", "--format", "{{.Size}}", image).stdout.strip()) / 1e6

    def inspect(self, container: str, template: str) -> str:
        return self("inspect", "--format", template, container).stdout.strip()


def usable_engine() -> tuple[Engine | None, str]:
    reasons = []
    for name in ("podman", "docker"):
        path = shutil.which(name)
        if path is None:
            reasons.append(f"no {name}")
            continue
        engine = Engine(name, path)
        info = subprocess.run(engine.argv("info"), capture_output=True, text=True, timeout=60)
        if info.returncode != 0:
            reasons.append(f"{name} info failed: {(info.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        return engine, ""
    return None, "; ".join(reasons)


@pytest.fixture(scope="module")
def engine(container_steps) -> Engine:
    found, reason = usable_engine()
    if found is None:
        skip_or_fail(f"no container engine can run containers here ({reason})")
    container_steps.note(f"engine: {found.name} ({found('--version').stdout.strip()})")
    return found


@pytest.fixture(scope="module")
def base_image(engine: Engine, container_steps) -> str:
    """The Dockerfile's PYTHON_IMAGE: CONVSERVE_PYTHON_IMAGE, else the debootstrap-built local base."""
    if os.environ.get("CONVSERVE_PYTHON_IMAGE"):
        return os.environ["CONVSERVE_PYTHON_IMAGE"]
    if shutil.which("debootstrap") is None:
        skip_or_fail("debootstrap is not installed (the local base image needs it)")
    if os.geteuid() != 0:
        missing("debootstrap needs root; set CONVSERVE_PYTHON_IMAGE to a Python 3.11 image to run these tests")
    with container_steps.step("base image (scripts/build-base-image.sh; cached after the first build)"):
        result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "build-base-image.sh")], capture_output=True,
                                text=True, timeout=1200, env={**os.environ, "CONTAINER_ENGINE": engine.path})
    assert result.returncode == 0, result.stderr[-3000:]
    image = result.stdout.strip().splitlines()[-1]
    container_steps.note(f"base image {image}: {engine.size_mb(image):.0f} MB")
    return image


def build(engine: Engine, target: str, tag: str, base_image: str, container_steps) -> str:
    ARTIFACTS.mkdir(exist_ok=True)
    with container_steps.step(f"build {target} image"):
        engine.build(target, tag, base_image, ARTIFACTS / f"containers-build-{target}.log")
    container_steps.note(f"{target} image: {engine.size_mb(tag):.0f} MB")
    return tag


@pytest.fixture(scope="module")
def serve_image(engine: Engine, base_image: str, container_steps) -> str:
    return build(engine, "serve", SERVE_IMAGE, base_image, container_steps)


@pytest.fixture(scope="module")
def train_image(engine: Engine, base_image: str, container_steps) -> str:
    return build(engine, "train", TRAIN_IMAGE, base_image, container_steps)


@pytest.fixture(scope="module")
def names(engine: Engine) -> Iterator:
    """``names("api")``: a unique container or volume name; whatever carries one is removed at the end."""
    prefix = f"convserve-test-{uuid.uuid4().hex[:8]}"
    made: list[str] = []

    def name(kind: str) -> str:
        made.append(f"{prefix}-{kind}")
        return made[-1]

    yield name
    for item in made:
        engine("rm", "-f", "-t", "0", item, check=False)
    for item in made:
        engine("volume", "rm", "-f", item, check=False)


def free_port() -> int:
    from tests.support.server import free_port as pick

    return pick()


def wait_ready(engine: Engine, container: str, url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if engine.inspect(container, "{{.State.Running}}") != "true":
            break
        time.sleep(0.5)
    logs = engine("logs", container, check=False)
    pytest.fail(f"{container} not ready: {(logs.stdout + logs.stderr)[-3000:]}")


def start_serve(engine: Engine, image: str, name: str, *args: str) -> str:
    """The serving image run detached with its own CMD, port 8000 published on a free loopback port."""
    port = free_port()
    engine("run", "-d", "--name", name, *engine.ulimits, "-p", f"127.0.0.1:{port}:8000", *args, image)
    url = f"http://127.0.0.1:{port}"
    wait_ready(engine, name, url)
    return url


def digits() -> list[tuple[str, bytes, int]]:
    labels = json.loads((TEST_DATA / "mnist" / "labels.json").read_text())
    return [(name, (TEST_DATA / "mnist" / name).read_bytes(), label) for name, label in sorted(labels.items())]


def predict(url: str, pngs: list[bytes]) -> dict:
    files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]
    response = httpx.post(f"{url}/models/mnist/predict", files=files, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def mnist_versions(url: str) -> dict[int, str]:
    models = {m["name"]: m for m in httpx.get(f"{url}/models", timeout=10).json()["models"]}
    return {v["version"]: v["state"] for v in models["mnist"]["versions"]}


# --- serve -------------------------------------------------------------------------------------

def test_serve_image_has_no_tensorflow_and_runs_as_uid_10001(engine, serve_image, container_steps):
    with container_steps.step("serve image: uid and installed packages"):
        run = engine("run", "--rm", *engine.ulimits, "--entrypoint", "python", serve_image, "-c",
                     "import importlib.util, json, os; print(json.dumps({'uid': os.getuid(), 'found': ["
                     "m for m in ('tensorflow', 'keras', 'training', 'service') if importlib.util.find_spec(m)]}))")
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found == {"uid": APP_UID, "found": ["service"]}
    assert "tensorflow" not in engine("run", "--rm", *engine.ulimits, "--entrypoint", "pip", serve_image,
                                      "list").stdout.lower()


def test_serve_container_classifies_a_digit_and_its_healthcheck_passes(engine, serve_image, names, container_steps):
    name = names("serve")
    with container_steps.step("serve container: start until ready"):
        url = start_serve(engine, serve_image, name)
    assert engine("exec", name, "id", "-u").stdout.strip() == str(APP_UID)
    assert engine.inspect(name, "{{.Config.User}}") == "convserve"

    samples = digits()
    body = predict(url, [png for _, png, _ in samples])
    predicted = [p["class_id"] for p in body["predictions"]]
    expected = [label for _, _, label in samples]
    assert predicted[0] == expected[0], f"{samples[0][0]} is a {expected[0]}, the container said {predicted[0]}"
    assert sum(p == e for p, e in zip(predicted, expected)) >= 0.95 * len(samples), (predicted, expected)

    # The image's own HEALTHCHECK, run inside the container the way the engine runs it.
    healthcheck = json.loads(engine.inspect(name, "{{json .Config.Healthcheck}}"))
    assert healthcheck["Test"][0] == "CMD" and "/v2/health/ready" in healthcheck["Test"][-1], healthcheck
    with container_steps.step("serve container: HEALTHCHECK command inside"):
        check = engine("exec", name, *healthcheck["Test"][1:], check=False)
    assert check.returncode == 0, check.stderr


def test_serve_container_stop_answers_requests_in_flight_and_exits_0(engine, serve_image, names, container_steps):
    name = names("drain")
    url = start_serve(engine, serve_image, name)
    samples = digits()[:6]
    started = [threading.Event() for _ in samples]
    results: list[object] = []

    def upload(event: threading.Event, png: bytes) -> None:
        try:
            response = httpx.post(f"{url}/models/mnist/predict", content=slow_multipart(png, event, pause=0.2),
                                  headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"}, timeout=60)
            results.append((response.status_code, response.json()))
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            results.append(exc)

    threads = [threading.Thread(target=upload, args=(event, png)) for event, (_, png, _) in zip(started, samples)]
    for thread in threads:
        thread.start()
    assert all(event.wait(20) for event in started), "uploads did not start"
    time.sleep(0.3)  # every request's headers are in; each body is still arriving
    with container_steps.step("serve container: stop (SIGTERM) with 6 uploads in flight"):
        stop = engine("stop", "-t", "60", name, timeout=120)
        for thread in threads:
            thread.join(timeout=60)
    assert stop.returncode == 0
    assert len(results) == len(samples)
    assert all(isinstance(r, tuple) and r[0] == 200 for r in results), results
    assert sorted(r[1]["predictions"][0]["class_id"] for r in results) == sorted(label for *_, label in samples)
    assert engine.inspect(name, "{{.State.ExitCode}}") == "0"
    logs = engine("logs", name)
    assert "Traceback" not in logs.stdout + logs.stderr


# --- train and the compose flow ----------------------------------------------------------------

def datasets_dir() -> Path:
    """The local datasets (as for the training tests): CONVSERVE_DATA_DIR, else ../shared/datasets."""
    path = Path(os.environ.get("CONVSERVE_DATA_DIR") or REPO_ROOT.parent / "shared" / "datasets")
    if not (path / "mnist.npz").is_file():
        missing(f"no local MNIST at {path}/mnist.npz (these tests never download datasets)")
    return path


def test_train_image_documented_command_needs_no_directory_flags(engine, train_image, names, container_steps):
    """`docker run -v <volume>:/models convserve-train train --recipe mnist`: no --models-dir, no --runs-dir."""
    data = datasets_dir()
    volume = names("documented-models")
    with container_steps.step("train container: documented command (--limit 200 --max-steps 2)"):
        run = engine("run", "--rm", *engine.ulimits, "-v", f"{volume}:/models", "-v", f"{data}:/data:ro",
                     train_image, "train", "--recipe", "mnist", "--epochs", "1", "--max-steps", "2", "--limit", "200",
                     "--data-dir", "/data", timeout=900, check=False)
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.returncode in (0, 3), run.stderr[-3000:]  # 3: the promotion gate kept the bundled version
    listing = engine("run", "--rm", *engine.ulimits, "-v", f"{volume}:/models", "--entrypoint", "ls",
                     train_image, "/models/mnist").stdout.split()
    assert ("2" in listing) == (run.returncode == 0), (run.returncode, listing)
    assert "1" in listing  # the volume was seeded from the image


@pytest.fixture(scope="module")
def compose_services(repo_root) -> dict:
    """docker-compose.yml as compose resolves it (its own defaults): what the compose flow below runs."""
    if shutil.which("docker-compose") is None:
        skip_or_fail("docker-compose is not installed (make system-deps installs it)")
    if (repo_root / ".env").exists():
        pytest.skip("a local .env would change the compose defaults under test")
    result = compose(repo_root, "config")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def volume_args(volumes: list, names_by_volume: dict[str, str]) -> list[str]:
    """compose `volumes:` entries (short syntax) as -v options, named volumes mapped to this test's names."""
    out = []
    for entry in volumes:
        source, target, *mode = entry.split(":")
        out += ["-v", ":".join([names_by_volume[source], target, *mode])]
    return out


def test_compose_flow_train_publishes_and_the_running_api_follows(engine, serve_image, train_image, names,
                                                                  compose_services, container_steps):
    """What `docker compose up` and `docker compose --profile train run --rm train ...` run: the api serving a
    models volume seeded from the image, polling it, and the train job writing into that volume. A short run
    against the bundled 99.4% model is refused by the promotion gate (exit 3): nothing new in the volume, version 1
    still served. The same run with --force publishes version 2, and the running api (same container) loads it
    and starts its rollout."""
    data = datasets_dir()
    api, train = compose_services["api"], compose_services["train"]
    volumes = {v: names(f"volume-{v}") for v in ("models", "state", "runs", "keras-datasets")}
    api_name = names("compose-api")
    env = [f"--env={key}={value}" for key, value in api["environment"].items()]
    poll = float(api["environment"]["CONVSERVE_REPOSITORY_POLL_SECONDS"])
    assert poll > 0
    with container_steps.step("compose: api up (models volume seeded from the image) until ready"):
        url = start_serve(engine, serve_image, api_name, *env, f"--cpus={api['cpus']}",
                          *volume_args(api["volumes"], volumes))
    started_at = engine.inspect(api_name, "{{.State.StartedAt}}")
    before = mnist_versions(url)
    assert before == {1: "READY"}, before
    assert predict(url, [digits()[0][1]])["version"] == 1

    command = [*train["command"], "--epochs", "1", "--limit", "2000", "--data-dir", "/data"]

    def train_run(*extra: str) -> subprocess.CompletedProcess:
        return engine("run", "--rm", *engine.ulimits, *volume_args(train["volumes"], volumes),
                      "-v", f"{data}:/data:ro", train_image, *command, *extra, timeout=1500, check=False)

    with container_steps.step("compose: train run --epochs 1 --limit 2000 (refused by the gate)"):
        refused = train_run()
    assert refused.returncode == 3, f"train exited {refused.returncode}: {refused.stderr[-3000:]}"
    assert "was not published" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    time.sleep(2 * poll)  # two polls: a version that had appeared would be loaded by now
    assert mnist_versions(url) == {1: "READY"}
    assert "2" not in engine("exec", api_name, "ls", "/models/mnist").stdout.split()

    with container_steps.step("compose: train run --force (published)"):
        forced = train_run("--force")
    assert forced.returncode == 0, f"train exited {forced.returncode}: {forced.stderr[-3000:]}"
    with container_steps.step(f"compose: api follows the volume (poll every {poll:g} s)"):
        state = wait_for_candidate(url, 2, 30 * poll + 60)
    assert predict(url, [digits()[0][1]])["version"] == 1  # a candidate is tried, not served at once
    # Without a restart: the same container process throughout.
    assert engine.inspect(api_name, "{{.State.StartedAt}}") == started_at
    assert engine.inspect(api_name, "{{.State.Running}}") == "true"
    container_steps.note(f"compose: train refused (exit 3), then --force published version 2 ({state['state']})")


def wait_for_candidate(url: str, version: int, timeout: float) -> dict:
    """Until the api has loaded ``version`` and its rollout shadows it (the shipped default mode)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = httpx.get(f"{url}/v2/models/mnist/rollout", timeout=10).json()
        if state["candidate"] == str(version) and mnist_versions(url).get(version) == "READY":
            assert state["state"] == "shadow" and state["stable"] == str(version - 1), state
            return state
        time.sleep(0.5)
    pytest.fail(f"no rollout of version {version}: {state}, versions {mnist_versions(url)}")


def rotated_digits(count: int) -> list[tuple[bytes, int]]:
    """MNIST training digits rotated by 45 degrees: traffic the bundled LeNet gets wrong about a quarter of the time."""
    from bench.refresh import png
    from training.data import load_dataset
    from training.recipes import MNIST_LABELS

    ds = load_dataset("mnist", (28, 28, 1), MNIST_LABELS, datasets_dir())
    return [(png(image), int(label)) for image, label in zip(ds.x_train[-count:], ds.y_train[-count:])]


def test_compose_flow_refresh_learns_from_feedback_and_the_running_api_rolls_it_out(
        engine, serve_image, train_image, names, compose_services, container_steps):
    """The closed loop as compose runs it: the api container logs predictions and takes labels into the SQLite file
    in the `state` volume; `docker compose --profile refresh run --rm refresh` reads that file from its own
    container, fine-tunes, and publishes version 2 into the `models` volume; the running api loads it and starts
    its rollout. What the test changes from compose's defaults: every request's inputs kept (default 10%)."""
    api, refresh = compose_services["api"], compose_services["refresh"]
    # Volumes of its own (the train flow's hold a version 2 and a rollout already): fresh, seeded from the image.
    volumes = {v: names(f"refresh-volume-{v}") for v in ("models", "state", "runs", "keras-datasets")}
    api_name = names("compose-refresh-api")
    env = [f"--env={key}={value}" for key, value in {**api["environment"], "CONVSERVE_KEEP_INPUTS": "1"}.items()]
    poll = float(api["environment"]["CONVSERVE_REPOSITORY_POLL_SECONDS"])
    with container_steps.step("compose: api up for the loop"):
        url = start_serve(engine, serve_image, api_name, *env, f"--cpus={api['cpus']}",
                          *volume_args(api["volumes"], volumes))
    assert mnist_versions(url) == {1: "READY"}  # a fresh models volume, seeded with the bundled version only
    assert httpx.get(f"{url}/v2/models/mnist/rollout", timeout=10).json()["candidate"] is None
    traffic = rotated_digits(300)
    with container_steps.step("compose: 300 rotated digits answered and labelled"):
        labels = []
        with httpx.Client(timeout=30) as client:
            for i, (png, label) in enumerate(traffic):
                r = client.post(f"{url}/models/mnist/predict", content=png,
                                headers={"Content-Type": "image/png", "X-Request-Id": f"cam-{i}"})
                assert r.status_code == 200, r.text
                labels.append({"id": f"cam-{i}", "label": label})
            r = client.post(f"{url}/v2/models/mnist/feedback", json={"feedback": labels})
            assert r.status_code == 200, r.text
    command = [*refresh["command"], "--epochs", "1", "--limit", "3000", "--data-dir", "/data", "--min-labelled", "100",
               "--tolerance", "1"]
    with container_steps.step("compose: refresh run --epochs 1 --limit 3000"):
        run = engine("run", "--rm", *engine.ulimits, *volume_args(refresh["volumes"], volumes),
                     "-v", f"{datasets_dir()}:/data:ro",
                     *[f"--env={k}={v}" for k, v in refresh["environment"].items()], train_image, *command,
                     timeout=1500, check=False)
    assert run.returncode == 0, f"refresh exited {run.returncode}: {run.stdout[-2000:]} {run.stderr[-3000:]}"
    assert "held-out feedback" in run.stdout and "Traceback" not in run.stderr, run.stderr[-3000:]
    with container_steps.step(f"compose: api starts the rollout of version 2 (poll every {poll:g} s)"):
        state = wait_for_candidate(url, 2, 30 * poll + 60)
    assert engine.inspect(api_name, "{{.State.Running}}") == "true"
    container_steps.note(f"compose: refresh published version 2; the api shadows it ({state['state']})")

