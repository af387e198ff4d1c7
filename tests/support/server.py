"""``python -m service`` as a real process on a free loopback port, like a user or the container runs it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_argv(models_dir: Path, port: int) -> list[str]:
    """The Dockerfile's serving CMD, with this interpreter for ``python`` and test values for its flags."""
    return [sys.executable, "-m", "service", "--models-dir", str(models_dir), "--host", "127.0.0.1",
            "--port", str(port)]


class ServiceProcess:
    """A service process, its output in a log file, started and then waited for until ``wait_for`` answers 200.

    ``log`` is a directory (the log is ``convserve-<port>.log`` in it; the temporary directory by default) or a
    file path. The server runs on the shipped defaults (workers ``auto``, batches where ``auto`` puts them,
    the admission gate on), as a user gets it; ``env`` adds what a test needs otherwise, and says so. Each
    process gets a SQLite state store of its own unless ``env`` names one. ``argv`` replaces
    :func:`default_argv`; give the ``port`` it listens on with it.

    A test that pins ``CONVSERVE_WORKERS`` also gets the batching mode named: ``CONVSERVE_INFERENCE_ON_LOOP=true``,
    what the defaults give (a worker per CPU: batches on the event loop), unless ``env`` names another. Left at
    ``auto``, a pinned worker count would put batches on the loop or on a thread by the runner's CPU count.
    """

    def __init__(self, models_dir: Path, log: Path | None = None, env: dict[str, str] | None = None,
                 argv: list[str] | None = None, port: int | None = None, wait_for: str = "/v2/health/ready",
                 timeout: float = 60) -> None:
        self.models_dir = models_dir
        self.port = port if port is not None else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = argv if argv is not None else default_argv(models_dir, self.port)
        log = Path(tempfile.gettempdir()) if log is None else log
        self.log_path = log / f"convserve-{self.port}.log" if log.is_dir() else log
        self.log = open(self.log_path, "w+")
        # A state store of its own (the default kind, a SQLite file), unless the test shares one on purpose.
        env = {"CONVSERVE_STATE_URL": f"sqlite:///{self.log_path.with_suffix('.sqlite')}", **(env or {})}
        if env.get("CONVSERVE_WORKERS", "auto") != "auto":
            env.setdefault("CONVSERVE_INFERENCE_ON_LOOP", "true")
        self.process = subprocess.Popen(self.argv, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **env})
        try:
            self.wait_until(wait_for, timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_until(self, path: str, timeout: float = 60) -> None:
        """Until ``path`` answers 200 (the service is started, its models loaded); killed if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}: {self.output()}")
            try:
                if httpx.get(f"{self.url}{path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"{path} not 200 after {timeout}s: {self.output()}")

    def output(self) -> str:
        """Everything the process has written to stdout and stderr so far."""
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def terminate(self) -> None:
        """SIGTERM, as ``docker stop`` sends it; does not wait."""
        self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 30 s; closes the log."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()

    def kill(self) -> None:
        """SIGKILL, at once; closes the log."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.log.close()

    def rss_bytes(self) -> int:
        """Resident memory of the server process (VmRSS)."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def metric(self, series: str) -> float:
        """The value of one series of /metrics, e.g. ``convserve_inflight_requests{model="mnist",version="1"}``;
        0 for a labelled series nobody has touched yet."""
        match = re.search(rf"^{re.escape(series)} ([0-9.e+-]+)$", self.metrics(), re.MULTILINE)
        return float(match.group(1)) if match else 0.0
