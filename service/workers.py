"""Several worker processes on one port, behaving as one service (``--workers N``, ``CONVSERVE_WORKERS``).

The process manager is uvicorn's own multiprocess supervisor (``uvicorn.supervisors.Multiprocess``): it is
already a dependency, binds the one listening socket that every worker accepts from, pings each worker over
a pipe and replaces one that dies or hangs, and on SIGTERM stops them all. Each worker runs the whole app
(:func:`service.app.create_app`) with its lifespan, so what starts there (models, batchers, the repository
poller, and any other server that must run in every worker) runs once per worker; a worker accepts
connections only once that lifespan has started, so only once its models are loaded.

What makes the workers one service is added here and in :mod:`service.cluster`:

- metrics: prometheus_client's multiprocess mode in a directory made for the run (the supervisor's
  environment, inherited by every worker); a dead worker's live gauges are removed (``mark_process_dead``);
- one model state and readiness over every worker: the shared state directory of :mod:`service.cluster`,
  from which a dead worker's entry is removed too;
- SIGTERM: readiness fails in every worker at once, requests keep being accepted for
  ``CONVSERVE_SHUTDOWN_DELAY_SECONDS``, then the listener closes and every worker drains its in-flight
  requests (up to ``CONVSERVE_DRAIN_SECONDS``) and the supervisor exits 0.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import tempfile
import threading
from multiprocessing import connection as mp_connection
from pathlib import Path
from socket import socket
from types import FrameType
from typing import Any

import uvicorn
from prometheus_client import multiprocess
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from service import cluster, metrics
from service.app import create_app
from service.http_protocol import ServiceHttpProtocol
from service.settings import Settings

log = logging.getLogger("uvicorn.error")  # the supervisor's messages go where uvicorn's own go

HEALTHCHECK_SECONDS = 30.0
"""A worker that does not answer the supervisor's ping for this long is killed and replaced. uvicorn's 5 s
default also applies to a worker still importing its libraries, which on a busy machine can take longer:
then every replacement would be killed before it could start."""


class Supervisor(Multiprocess):
    """uvicorn's supervisor, plus the clean-up of dead workers' state and the SIGTERM sequence."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket], state_dir: Path, metrics_dir: Path,
                 shutdown_delay: float) -> None:
        super().__init__(config, sockets)
        self.state_dir = state_dir
        self.metrics_dir = metrics_dir
        self.shutdown_delay = shutdown_delay
        self.startup_failed = False
        self._expected = config.workers
        self._draining = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop_signal)

    def _stop_signal(self, sig: int, frame: FrameType | None) -> None:
        cluster.begin_drain(self.state_dir)  # readiness fails now, not at the supervisor's next tick
        self.signal_queue.append(sig)

    def keep_subprocess_alive(self) -> None:
        before = list(self.processes)
        for process in before:  # uvicorn's Process objects, made by uvicorn: their liveness check is ours
            process.is_alive = functools.partial(_answers, process)  # type: ignore[method-assign]
        super().keep_subprocess_alive()  # kills a hung worker, replaces a dead one
        for process in before:
            if process.pid is not None and process.exitcode is not None:
                multiprocess.mark_process_dead(process.pid, str(self.metrics_dir))
                metrics.compact_dead_process(str(self.metrics_dir), process.pid)
                (self.metrics_dir / f"exemplars_{process.pid}.json").unlink(missing_ok=True)  # service.tracing
                cluster.forget_worker(self.state_dir, process.pid)
                self.startup_failed = self.startup_failed or process.exitcode == STARTUP_FAILURE
        if self.processes_num != self._expected:  # SIGTTIN / SIGTTOU changed the count
            self._expected = self.processes_num
            cluster.set_expected(self.state_dir, self._expected)

    def handle_term(self) -> None:
        cluster.begin_drain(self.state_dir)
        if self.shutdown_delay > 0 and not self._draining:
            self._draining = True  # a second SIGTERM stops waiting
            log.info("Received SIGTERM: readiness fails; still accepting for %g s", self.shutdown_delay)
            timer = threading.Timer(self.shutdown_delay, self.should_exit.set)
            timer.daemon = True
            timer.start()
            return
        super().handle_term()

    def terminate_all(self) -> None:
        cluster.begin_drain(self.state_dir)
        for sock in self.sockets:
            # The workers hold their own copies: closing ours means that once they have closed theirs, new
            # connections are refused rather than queued where no worker will accept them.
            sock.close()
        super().terminate_all()


def _answers(process: Any, timeout: float = 5) -> bool:
    """uvicorn's liveness check of a worker (a ping answered within ``timeout``), except that a worker that dies
    while the ping waits is seen at once, by its process sentinel: uvicorn's waits the whole timeout (30 s here)
    on a pipe the dead worker will never answer, and the pod serves with one worker less all that time."""
    if not process.process.is_alive():
        return False
    try:
        process.parent_conn.send(b"ping")
        ready = mp_connection.wait([process.parent_conn, process.process.sentinel], timeout)
        if process.parent_conn not in ready:
            return False  # dead (its sentinel), or hung past the timeout
        process.parent_conn.recv()
        return True
    except Exception:  # a broken pipe, or an answer that does not unpickle (as uvicorn's own check treats them)
        return False


def serve(settings: Settings, log_config: dict[str, Any]) -> int:
    """Run ``settings.worker_count`` workers until SIGTERM or SIGINT; the exit status."""
    with tempfile.TemporaryDirectory(prefix="convserve-") as run_dir:
        state_dir = Path(run_dir)  # the workers' shared state (service.cluster), the metrics beside it
        metrics_dir = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or Path(run_dir) / "metrics")
        metrics_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*metrics_dir.glob("*.db"), *metrics_dir.glob("exemplars_*.json")]:
            stale.unlink()  # a previous run's values must not be added to this one's
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # inherited by every worker
        cluster.prepare(state_dir, settings.worker_count)
        config = uvicorn.Config(
            functools.partial(create_app, settings, cluster_dir=state_dir, freeze_startup=True), factory=True,
            host=settings.host, port=settings.port, workers=settings.worker_count,
            log_level=settings.log_level.lower(), log_config=log_config, access_log=False, server_header=False,
            http=ServiceHttpProtocol, limit_concurrency=settings.max_connections,
            timeout_graceful_shutdown=settings.drain_seconds, timeout_worker_healthcheck=HEALTHCHECK_SECONDS)
        supervisor = Supervisor(config, [config.bind_socket()], state_dir, metrics_dir,
                                settings.shutdown_delay_seconds)
        supervisor.run()
        return STARTUP_FAILURE if supervisor.startup_failed else 0
