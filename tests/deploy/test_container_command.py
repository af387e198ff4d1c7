"""The serving image's CMD and HEALTHCHECK are the commands these tests run, and they work for real."""

from __future__ import annotations

import ast
import subprocess
import sys

import httpx

from service.__main__ import parse_args

EXPECTED_CMD = ["python", "-m", "service", "--models-dir", "/models", "--host", "0.0.0.0", "--port", "8000"]


def flags(argv: list[str]) -> list[str]:
    return [arg for arg in argv if arg.startswith("--")]


def test_cmd_is_the_service_module_on_all_interfaces_port_8000(container_command):
    assert container_command == EXPECTED_CMD
    args = parse_args(container_command[3:])
    assert (str(args.models_dir), args.host, args.port) == ("/models", "0.0.0.0", 8000)


def test_service_tests_real_server_runs_the_same_module_and_flags(container_command, repo_root):
    """tests/support/server.py default_argv (the real server of the protocol end-to-end, web and reliability
    tests) starts the same command."""
    tree = ast.parse((repo_root / "tests" / "support" / "server.py").read_text())
    function = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "default_argv")
    (returned,) = [n for n in ast.walk(function) if isinstance(n, ast.Return)]
    elements = returned.value.elts
    assert ast.unparse(elements[0]) == "sys.executable"
    constants = [e.value for e in elements[1:] if isinstance(e, ast.Constant)]
    assert constants[:2] == container_command[1:3] == ["-m", "service"]
    assert flags(constants) == flags(container_command) == ["--models-dir", "--host", "--port"]
    assert len(elements) == len(container_command)  # one value per flag, nothing else


def test_the_deploy_tests_run_the_container_command(start_service, tiny_repo, container_command):
    service = start_service(tiny_repo)
    assert service.argv[0] == sys.executable
    assert service.argv[1:3] == container_command[1:3]
    assert flags(service.argv) == flags(container_command)
    assert httpx.get(f"{service.url}/v2/health/live").status_code == 200


def test_healthcheck_command_passes_only_when_ready(dockerfile, exec_form_args, start_service, tiny_repo,
                                                    repo_with_broken_version, tmp_path):
    """The HEALTHCHECK's own command line, pointed at a test port: exit 0 when ready, non-zero otherwise."""
    (healthcheck,) = dockerfile.default.all("HEALTHCHECK")
    command = exec_form_args(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "python"
    assert "http://127.0.0.1:8000/v2/health/ready" in command[-1]

    def run(port: int) -> int:
        argv = [sys.executable, *command[1:-1], command[-1].replace(":8000/", f":{port}/")]
        return subprocess.run(argv, capture_output=True, timeout=30).returncode

    ready = start_service(tiny_repo)
    assert run(ready.port) == 0
    # A model with no loadable version: live, but not ready (503).
    broken = tmp_path / "models"
    (broken / "digits" / "1").mkdir(parents=True)
    (broken / "digits" / "1" / "model.onnx").write_bytes(b"not a model")
    not_ready = start_service(broken, wait_for="live")
    assert httpx.get(f"{not_ready.url}/v2/health/ready").status_code == 503
    assert run(not_ready.port) != 0
    not_ready.kill()
    assert run(not_ready.port) != 0  # nothing listening
