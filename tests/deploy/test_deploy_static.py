"""Static checks of the Dockerfile, .dockerignore, docker-compose.yml, .env.example and the docs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib

import pytest
import yaml

from tests.support.missing import missing


def project_dependencies(repo_root) -> tuple[list[str], list[str]]:
    """pyproject.toml's base dependencies and its [train] extra."""
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    return project["dependencies"], project["optional-dependencies"]["train"]

# --- Dockerfile --------------------------------------------------------------------------------


def pip_installs(stage) -> list[str]:
    return [args for args in stage.all("RUN") if "pip install" in args]


def copies(stage) -> list[list[str]]:
    """COPY sources and destination, without --flags."""
    return [[part for part in args.split() if not part.startswith("--")] for args in stage.all("COPY")]


def test_stages_base_train_serve_and_serve_is_the_default(dockerfile, repo_root):
    assert [s.name for s in dockerfile.stages] == ["base", "train", "serve"]
    assert dockerfile.default.name == "serve"  # `docker build .` builds the last stage
    assert dockerfile.stage("base").base == "${PYTHON_IMAGE}"
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", (repo_root / "Dockerfile").read_text(), re.M)
    assert dockerfile.stage("train").base == "base"
    assert dockerfile.stage("serve").base == "base"


def test_serve_runs_as_the_non_root_user_created_in_base(dockerfile):
    serve = dockerfile.stage("serve")
    users = serve.all("USER")
    assert users, "the serving stage must switch to a non-root USER"
    user = users[-1]
    assert user not in ("root", "0") and not user.startswith("0:")
    created = " ".join(dockerfile.stage("base").all("RUN"))
    assert re.search(rf"useradd .*--uid (\d+) .*\b{user}\b", created)
    assert "--uid 0 " not in created
    # Nothing after the USER switches back.
    keywords = [k for k, _ in serve.instructions]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")


def test_serve_installs_dependencies_before_copying_code(dockerfile):
    for stage in (dockerfile.stage("serve"), dockerfile.stage("train")):
        keywords = [(k, a) for k, a in stage.instructions if k in ("COPY", "RUN")]
        first_install = next(i for i, (k, a) in enumerate(keywords) if k == "RUN" and "pip install" in a)
        first_code = next(i for i, (k, a) in enumerate(keywords) if k == "COPY" and "service/" in a)
        assert first_install < first_code, stage.name
        # Before the install only the dependency declaration is copied.
        assert [a for k, a in keywords[:first_install] if k == "COPY"] == ["pyproject.toml ./"]


def test_serve_has_no_tensorflow(dockerfile, repo_root):
    base, train = project_dependencies(repo_root)
    base_deps = " ".join(base).lower()
    assert "tensorflow" not in base_deps and "keras" not in base_deps
    assert any("tensorflow" in d for d in train)
    for stage in (dockerfile.stage("base"), dockerfile.stage("serve")):
        text = " ".join(args for _, args in stage.instructions).lower()
        assert "tensorflow" not in text and "[train]" not in text and "[tf]" not in text, stage.name
        assert "training/" not in text, "the training package has no business in the serving image"
    (install,) = pip_installs(dockerfile.stage("serve"))
    # The project's base dependencies and the [tracing] extra (the OpenTelemetry SDK, off unless asked) only.
    assert re.search(r"pip install '\.\[tracing\]'(\s|$)", install), install
    assert re.search(r"pip install '\.\[train\]'", pip_installs(dockerfile.stage("train"))[0])


def test_serve_ports_env_models_healthcheck_and_cmd(dockerfile, exec_form_args, container_command,
                                                    settings_env_names):
    serve = dockerfile.stage("serve")
    assert serve.all("EXPOSE") == ["8000 8001"]  # HTTP, gRPC
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(serve.all("ENV"))))
    assert env["CONVSERVE_HOST"] == "0.0.0.0"
    assert {k for k in env if k.startswith("CONVSERVE_")} <= settings_env_names
    assert ["models/", "/models/"] in copies(serve)
    assert container_command[container_command.index("--models-dir") + 1] == "/models"
    assert container_command[container_command.index("--port") + 1] == "8000"
    (healthcheck,) = serve.all("HEALTHCHECK")
    options, command = healthcheck.split(" CMD ", 1)
    command = exec_form_args(command)
    assert command[:2] == ["python", "-c"] and "urllib.request" in command[2]  # slim has no curl
    assert "/v2/health/ready" in command[2]
    assert "--interval=" in options and "--start-period=" in options
    (cmd,) = serve.all("CMD")
    assert cmd.startswith("[")  # exec form: python is PID 1 and gets SIGTERM itself


def test_train_target(dockerfile, exec_form_args, repo_root):
    train = dockerfile.stage("train")
    assert exec_form_args(train.all("ENTRYPOINT")[0]) == ["python", "-m", "training"]
    assert ["training/", "training/"] in copies(train)
    assert ["models/", "/models/"] in copies(train)  # seeds the shared volume the same as serve
    assert train.all("USER") and train.all("USER")[-1] not in ("root", "0")
    # The compose volumes' mount points exist in the image, owned by the user (else root owns the volume).
    compose = yaml.safe_load((repo_root / "docker-compose.yml").read_text())["services"]["train"]
    owned = " ".join(a for a in train.all("RUN") if "chown" in a) + " " + " ".join(
        a.split()[-1] for a in train.all("COPY") if "--chown=" in a)
    for volume in compose["volumes"]:
        assert volume.split(":")[1].rstrip("/") in owned, volume


def docker_ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes ``path`` (or a parent directory of it); no `!` patterns here."""
    def regex(pattern: str) -> re.Pattern:
        out = ""
        for part in re.split(r"(\*\*/|\*|\?)", pattern.strip("/")):
            out += {"**/": "(.*/)?", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        return re.compile(out + "$")

    compiled = [regex(p) for p in patterns]
    parts = path.split("/")
    return any(r.match("/".join(parts[:i])) for r in compiled for i in range(1, len(parts) + 1))


def test_dockerignore(dockerfile, repo_root):
    patterns = [line.strip() for line in (repo_root / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)
    for excluded in (".venv/bin/python", "runs/mnist/x/best.keras", ".git/HEAD", "service/__pycache__/app.pyc",
                     ".pytest_cache/v", ".ruff_cache/x", "tests/deploy/conftest.py", "convserve.egg-info/PKG-INFO",
                     ".env", "models/mnist/.staging-3/model.onnx"):
        assert docker_ignored(excluded, patterns), excluded
    # Everything the Dockerfile copies is in the build context.
    for stage in dockerfile.stages:
        for *sources, _ in copies(stage):
            for source in sources:
                assert (repo_root / source).exists(), source
                assert not docker_ignored(source.rstrip("/"), patterns), source
    for needed in ("service/app.py", "training/cli.py", "models/mnist/1/model.onnx", "models/mnist/config.pbtxt"):
        assert not docker_ignored(needed, patterns), needed


# --- docker-compose ----------------------------------------------------------------------------

def compose(repo_root, *args: str) -> subprocess.CompletedProcess:
    # A clean environment: the file's own defaults, not this shell's CONVSERVE_* variables.
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(["docker-compose", "-f", "docker-compose.yml", *args], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def compose_config(repo_root) -> dict:
    if shutil.which("docker-compose") is None:
        missing("docker-compose is not installed (make system-deps installs it)")
    if (repo_root / ".env").exists():
        pytest.skip("a local .env would change the compose defaults under test")
    result = compose(repo_root, "config")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration))


def test_compose_config_is_valid(compose_config):
    assert set(compose_config["services"]) == {"api", "prometheus", "grafana", "train", "refresh", "postgres",
                                               "jaeger"}
    assert set(compose_config["volumes"]) >= {"models", "state"}


def test_compose_api(compose_config, container_command, settings_env_names):
    api = compose_config["services"]["api"]
    assert api["build"]["target"] == "serve"
    assert api["ports"] == ["127.0.0.1:8000:8000/tcp", "127.0.0.1:8001:8001/tcp"]
    assert "models:/models:ro" in api["volumes"]
    assert "state:/var/lib/convserve:rw" in api["volumes"]  # the SQLite state store outlives the container
    env = api["environment"]
    assert env["CONVSERVE_STATE_URL"] == "sqlite:////var/lib/convserve/convserve.sqlite"
    assert {name for name in env if not name.startswith("OTEL_")} <= settings_env_names
    # Tracing is off unless asked; then the standard OTEL_* variables send it to the tracing profile's Jaeger.
    assert env["CONVSERVE_TRACING"] == "false"
    assert {name for name in env if name.startswith("OTEL_")} == {
        "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert compose_config["services"]["jaeger"]["profiles"] == ["tracing"]
    assert env["CONVSERVE_ADMIN_TOKEN"] == ""  # the repository API stays off
    assert float(env["CONVSERVE_REPOSITORY_POLL_SECONDS"]) > 0  # picks up what `train` publishes
    assert seconds(api["stop_grace_period"]) > float(env["CONVSERVE_DRAIN_SECONDS"]) + 5
    assert "/v2/health/ready" in " ".join(api["healthcheck"]["test"])
    assert "command" not in api and "entrypoint" not in api  # the image's CMD, the tested one


def test_compose_healthcheck_is_the_images(compose_config, dockerfile, exec_form_args):
    (healthcheck,) = dockerfile.default.all("HEALTHCHECK")
    image_command = exec_form_args(healthcheck.split(" CMD ", 1)[1])
    assert compose_config["services"]["api"]["healthcheck"]["test"] == ["CMD", *image_command]


def test_compose_monitoring_and_training(compose_config):
    services = compose_config["services"]
    prometheus = services["prometheus"]
    assert prometheus["depends_on"] == {"api": {"condition": "service_healthy"}}
    assert any(v.endswith("deploy/prometheus:/etc/prometheus:ro") for v in prometheus["volumes"])
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert prometheus["ports"][0].startswith("127.0.0.1:")
    grafana = services["grafana"]
    assert "prometheus" in grafana["depends_on"]
    assert grafana["ports"][0].startswith("127.0.0.1:")
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert mounts["/etc/grafana/provisioning"].endswith("deploy/grafana/provisioning")
    assert mounts["/etc/grafana/dashboards"].endswith("deploy/grafana/dashboards")
    train = services["train"]
    assert train["profiles"] == ["train"]
    assert train["build"]["target"] == "train"
    assert "models:/models:rw" in train["volumes"]
    command = train["command"]
    assert command[0] == "train" and command[command.index("--models-dir") + 1] == "/models"


def test_env_example_lists_every_compose_variable_with_its_default(repo_root, compose_config):
    text = (repo_root / "docker-compose.yml").read_text()
    used = dict(re.findall(r"\$\{(\w+):-([^}]*)\}", text))
    assert not re.findall(r"\$\{(\w+)\}", text), "every variable needs a default"
    example = dict(re.findall(r"^(\w+)=(.*)$", (repo_root / ".env.example").read_text(), re.M))
    assert example == used
    # And therefore the file means the same with or without a copy of .env.example.
    result = compose(repo_root, "--env-file", ".env.example", "config")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == compose_config


def test_compose_file_also_for_compose_v2(repo_root):
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True) \
        if shutil.which("docker") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("the docker compose v2 plugin is not installed (docker-compose v1 validated the file)")
    result = subprocess.run(["docker", "compose", "-f", "docker-compose.yml", "config", "--quiet"], cwd=repo_root,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --- docs --------------------------------------------------------------------------------------

def test_docs_cover_every_deployment_file(repo_root):
    docs = (repo_root / "docs" / "deploy.md").read_text()
    readme = (repo_root / "README.md").read_text()
    section = readme[readme.index("## Deployment"):]
    section = section[:section.find("\n## ", 1) if "\n## " in section[1:] else len(section)]
    assert "docs/deploy.md" in section
    for path in ("Dockerfile", "docker-compose.yml", ".env.example", "deploy/prometheus", "deploy/grafana",
                 "deploy/k8s"):
        assert path in section, path
        assert path in docs, path
    for phrase in ("--profile train", "CONVSERVE_REPOSITORY_POLL_SECONDS", "--model_base_path=/models/mnist",
                   "--model-repository=/models", "CONVSERVE_DRAIN_SECONDS", "cpu.max"):
        assert phrase in docs, phrase


def test_the_compose_default_admin_token_keeps_the_repository_api_off(compose_config, tiny_repo, monkeypatch):
    """compose passes CONVSERVE_ADMIN_TOKEN='' by default: the service must read that as off."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    token = compose_config["services"]["api"]["environment"]["CONVSERVE_ADMIN_TOKEN"]
    monkeypatch.setenv("CONVSERVE_ADMIN_TOKEN", token)
    settings = Settings(models_dir=tiny_repo, access_log=False, inference_threads=1, repository_poll_seconds=0)
    with TestClient(create_app(settings)) as client:
        for auth in ({}, {"authorization": "Bearer "}, {"authorization": "Bearer x"}):
            assert client.post("/v2/repository/index", headers=auth).status_code == 403
