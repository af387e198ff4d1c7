"""The README's examples work: every fenced ``curl`` and ``python -m`` command and every fenced Python
snippet in README.md runs, in README order, against a real server on the bundled models.

Only what the reader would have to adapt is changed: the ports (8000 for HTTP, 8001 for gRPC) become the
test server's, ``$TOKEN`` is the server's admin token, ``.venv/bin/python`` is this interpreter and
``../shared/datasets`` the local datasets. The files the examples send are the repository's ``examples/``.
An example fails when its command exits non-zero; ``curl`` runs with ``--fail-with-body``, so any HTTP
error answer fails it. Examples added to the README later are picked up without changing this file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.missing import missing
from tests.support.server import ServiceProcess, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
README = REPO_ROOT / "README.md"
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"
ADMIN_TOKEN = "readme-examples-token"

# The examples that are not run, and why. Everything else runs: keep this list short.
SKIPPED = {
    r"-m training train\b": "trains a model (minutes to hours of CPU) and publishes a new version into models/",
    r"-m training export\b": "needs a checkpoint of a training run (runs/<recipe>/<run>/best.keras)",
    r"-m training refresh\b": "needs labelled production traffic in the server's store; "
                               "tests/training/test_refresh.py runs the loop end to end",
    r"-m service\b": "starts a server itself: the server these examples run against is that command",
}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SHELL_LANGUAGES = {"sh", "bash", "shell"}
# A command whose first word, after any VAR=value assignments, is curl or a python -m.
ASSIGNMENT = r"""\w+=(?:'[^']*'|"[^"]*"|\S+)\s+"""
EXAMPLE_COMMAND = re.compile(rf"\s*(?:{ASSIGNMENT})*(?:curl|(?:\S*/)?python3?\s+-m)\s")
PORTS = re.compile(r"\b(?:localhost|127\.0\.0\.1):(8000|8001)\b")


@dataclass(frozen=True)
class Example:
    kind: str  # "sh" or "python"
    code: str
    line: int  # where it starts in the README

    @property
    def id(self) -> str:
        return f"L{self.line}-" + re.sub(r"\W+", "-", self.code.strip())[:60].strip("-")


def shell_is_complete(text: str) -> bool:
    """Whether ``text`` is whole shell commands (no open quote, no trailing continuation), as bash parses it."""
    if text.rstrip().endswith("\\"):
        return False
    return subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True).returncode == 0


def shell_commands(block: str) -> list[tuple[int, str]]:
    """The commands of a shell block with the line offset each starts on; a command may span lines."""
    commands: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, line in enumerate(block.splitlines()):
        if not pending:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            start = number
        pending.append(line)
        if shell_is_complete("\n".join(pending)):
            commands.append((start, "\n".join(pending)))
            pending = []
    assert not pending, f"unterminated shell command: {pending}"
    return commands


def markdown_examples(text: str) -> list[Example]:
    """Fenced ``curl`` / ``python -m`` commands of shell blocks and whole fenced Python blocks, in order."""
    examples = []
    for match in FENCE.finditer(text):
        language, body = match.group(1), match.group(2)
        first_line = text.count("\n", 0, match.start(2)) + 1
        if language == "python":
            examples.append(Example("python", body, first_line))
        elif language in SHELL_LANGUAGES:
            for offset, command in shell_commands(body):
                if EXAMPLE_COMMAND.match(command.replace("\\\n", " ")):
                    examples.append(Example("sh", command, first_line + offset))
    return examples


def skip_reason(example: Example) -> str | None:
    return next((why for pattern, why in SKIPPED.items() if re.search(pattern, example.code)), None)


README_EXAMPLES = markdown_examples(README.read_text())


@pytest.fixture(scope="module")
def datasets() -> Path | None:
    configured = os.environ.get("CONVSERVE_DATA_DIR")
    path = Path(configured) if configured else SHARED_DATASETS
    return path if path.is_dir() else None


@pytest.fixture(scope="module")
def grpc_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory, grpc_port) -> ServiceProcess:
    """``make serve`` on the bundled models, on free ports, with the repository API on (``$TOKEN``).

    One worker and the gRPC port are set for servers that have them; other servers ignore the variables.
    """
    running = ServiceProcess(REPO_ROOT / "models", log=tmp_path_factory.mktemp("readme-server"),
                             env={"CONVSERVE_ADMIN_TOKEN": ADMIN_TOKEN, "CONVSERVE_GRPC_PORT": str(grpc_port),
                                  "CONVSERVE_WORKERS": "1"})
    yield running
    running.stop()


def localise(code: str, ports: dict[str, int], datasets: Path | None) -> str:
    """The example as the reader runs it on this machine: the test server's ports, this interpreter, the data."""
    code = PORTS.sub(lambda m: f"127.0.0.1:{ports[m.group(1)]}", code)
    code = code.replace(".venv/bin/python", "python")
    if "../shared/datasets" in code:
        if datasets is None:
            missing("no local datasets: set CONVSERVE_DATA_DIR or provide ../shared/datasets")
        code = code.replace("../shared/datasets", str(datasets))
    return code


def restore_models(server: ServiceProcess) -> None:
    """Load every bundled model again, after a repository-API example may have unloaded one."""
    for model in sorted(p.name for p in (REPO_ROOT / "models").iterdir() if p.is_dir() and p.name[0] != "."):
        response = httpx.post(f"{server.url}/v2/repository/models/{model}/load", timeout=120,
                              headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("example", README_EXAMPLES, ids=[e.id for e in README_EXAMPLES])
def test_readme_example_works(example, readme_server, grpc_port, datasets, tmp_path):
    if reason := skip_reason(example):
        pytest.skip(reason)
    code = localise(example.code, {"8000": readme_server.port, "8001": grpc_port}, datasets)
    # This interpreter's python first on PATH: `python -m` and `python3 -c` in the examples are the project's.
    env = {**os.environ, "TOKEN": ADMIN_TOKEN,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if example.kind == "python":
        script = tmp_path / "example.py"
        script.write_text(code)
        argv = [sys.executable, str(script)]
    else:
        argv = ["bash", "-c", 'set -euo pipefail\ncurl() { command curl -sS --fail-with-body "$@"; }\n' + code]
    try:
        result = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        if "/v2/repository/" in example.code:
            restore_models(readme_server)
    assert result.returncode == 0, (f"README.md line {example.line} failed with {result.returncode}:\n{code}\n"
                                    f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}")


# --- the reader of the examples: checked on its own, so that it cannot quietly find nothing ----------------

def test_examples_are_read_whole_across_lines_and_continuations():
    text = "\n".join([
        "```sh",
        "make serve   # not an example",
        "curl -d '{\"a\": [1,",
        "          2]}' localhost:8000/x",
        "# a comment",
        "X='{\"k\": 1}' \\",
        "  python -m training train --recipe mnist",
        "curl -s localhost:8000/metrics | grep convserve_",
        "```",
        "```json",
        "{\"not\": \"run\"}",
        "```",
        "```python",
        "print('hello')",
        "```",
    ])
    examples = markdown_examples(text)
    assert [(e.kind, e.line) for e in examples] == [("sh", 3), ("sh", 6), ("sh", 8), ("python", 14)]
    assert examples[0].code == "curl -d '{\"a\": [1,\n          2]}' localhost:8000/x"
    assert skip_reason(examples[1]) == SKIPPED[r"-m training train\b"]
    assert skip_reason(examples[2]) is None


def test_the_readme_examples_cover_every_protocol_and_the_training_cli():
    commands = [e.code for e in README_EXAMPLES if e.kind == "sh"]
    for route in ("/models/mnist/predict", "/v2/models/mnist/infer", "/v1/models/mnist:predict", "/metrics",
                  "/v2/repository/"):
        assert any(route in c for c in commands), route
    assert any("-m training evaluate" in c for c in commands)
    assert any(e.kind == "python" for e in README_EXAMPLES)
    assert len([e for e in README_EXAMPLES if skip_reason(e)]) <= len(SKIPPED) + 2


def test_every_file_an_example_sends_is_in_the_repository():
    # curl's @file and the shell's < file, in the examples that run
    sent = {path for e in README_EXAMPLES if not skip_reason(e)
            for match in re.findall(r"@([\w./-]+)|<\s*([\w./-]+)", e.code) for path in match if path}
    assert "examples/digit.png" in sent
    for path in sent:
        assert (REPO_ROOT / path).is_file(), path


def test_the_example_images_are_what_examples_readme_says(readme_server):
    rows = re.findall(r"^\| `([^`]+)` \|[^|]*\|[^|]*\| `([\w-]+)`: (\w+) \|$",
                      (REPO_ROOT / "examples" / "README.md").read_text(), re.MULTILINE)
    assert {name for name, _, _ in rows} == {p.name for p in (REPO_ROOT / "examples").iterdir()
                                            if p.suffix in (".png", ".jpg")}
    for name, model, label in rows:
        response = httpx.post(f"{readme_server.url}/models/{model}/predict", timeout=30,
                              files={"file": (name, (REPO_ROOT / "examples" / name).read_bytes())})
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["label"] == label, name
