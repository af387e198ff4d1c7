"""Servers under test: started as subprocesses on a free loopback port, measured through /proc, always stopped.

Each server runs in its own session (process group), so stopping it also stops any workers it
forked (BentoML's), and nothing else. CPU time and RSS are summed over the server's process tree.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ServerStartError(RuntimeError):
    """The server exited or did not become ready in time; the message says why (with its log's tail)."""


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server. ``{port}`` in the command is replaced by the port chosen at start."""

    name: str
    command: list[str]
    ready_path: str
    """GET this until it answers 200."""
    predict_path: str
    """Where single-image uploads go (multipart field ``file``)."""
    env: dict[str, str] = field(default_factory=dict)
    start_timeout_s: float = 60.0


@dataclass
class RunningServer:
    spec: ServerSpec
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """User + system CPU of the process tree so far (including reaped children)."""
        return sum(_stat(pid)[1] for pid in process_tree(self.process.pid))

    def runqueue_wait_seconds(self) -> float:
        """Time the tree's threads spent runnable but waiting for a CPU (/proc/PID/task/TID/schedstat).

        High values mean the machine, not the server, was the bottleneck during a window.
        """
        total = 0
        for pid in process_tree(self.process.pid):
            try:
                tasks = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tasks:
                try:
                    total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        return total / 1e9

    def rss_mb(self) -> float:
        """VmRSS summed over the process tree (shared pages count once per process)."""
        return sum(_rss_kb(pid) for pid in process_tree(self.process.pid)) / 1024

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# --- /proc ---------------------------------------------------------------------------------------

def _stat(pid: int) -> tuple[int, float]:
    """(parent pid, CPU seconds: utime + stime + cutime + cstime) of one process; (0, 0) if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0, 0.0
    fields = text.rsplit(")", 1)[1].split()  # fields[0] is the state (field 3 of proc(5))
    return int(fields[1]), sum(int(x) for x in fields[11:15]) / CLOCK_TICKS


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent, _ = _stat(int(entry))
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


# --- Lifecycle -----------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, urllib.error.URLError):
        return 0


def _wait_ready(server: RunningServer) -> None:
    deadline = time.monotonic() + server.spec.start_timeout_s
    url = server.base_url + server.spec.ready_path
    while time.monotonic() < deadline:
        code = server.process.poll()
        if code is not None:
            raise ServerStartError(f"{server.spec.name} exited with status {code}:\n{server.log_tail()}")
        if _get(url) == 200:
            return
        time.sleep(0.25)
    raise ServerStartError(f"{server.spec.name} not ready after {server.spec.start_timeout_s:.0f} s:\n"
                           f"{server.log_tail()}")


def settle(server: RunningServer, window_s: float = 0.25, idle_cpu_s: float = 0.02, timeout_s: float = 15.0) -> bool:
    """Wait until the server stops burning CPU: closed-loop clients that leave (wrk at its end) can leave
    work behind that would otherwise be billed to, and queue ahead of, the next measurement."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = server.cpu_seconds()
        time.sleep(window_s)
        if server.cpu_seconds() - before < idle_cpu_s:
            return True
    return False


def _stop(server: RunningServer) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after a grace period."""
    group = server.process.pid  # start_new_session: the server leads its own group
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        server.process.wait(timeout=25)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(group, signal.SIGKILL)  # stragglers: workers the supervisor left, or a hung server
    except ProcessLookupError:
        pass
    server.process.wait()


@contextmanager
def running(spec: ServerSpec, cwd: Path, log_dir: Path) -> Iterator[RunningServer]:
    """Start ``spec`` on a free port, wait until ready, yield it, and stop it whatever happens."""
    port = free_port()
    log_path = log_dir / f"{spec.name.replace(' ', '_').replace('/', '_')}-{port}.log"
    command = [part.replace("{port}", str(port)) for part in spec.command]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=cwd, env={**os.environ, **spec.env}, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    server = RunningServer(spec, process, port, log_path)
    try:
        _wait_ready(server)
        yield server
    finally:
        _stop(server)
