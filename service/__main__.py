"""``python -m service``: start the server. Flags override the ``CONVSERVE_*`` settings.

With ``--workers 1`` one process serves; with more (the default ``auto``: one per usable CPU) a supervisor
runs that many workers on the one port (:mod:`service.workers`).

SIGTERM (``docker stop``, Kubernetes) drains: readiness fails at once, requests are still accepted for
``shutdown_delay_seconds`` (0 by default), then the listening socket closes, in-flight requests get up to
``drain_seconds`` to finish, the models unload, and the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import NoReturn

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from service import grpc_api, tracing, workers
from service.app import create_app
from service.http_protocol import ServiceHttpProtocol
from service.runtimes import runtime_problem
from service.settings import Settings
from service.state.store import StateStore, StateStoreError

# uvicorn's own messages in the same one-JSON-object-per-line format as the service's.
UVICORN_LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "service.middleware.JsonFormatter"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
    "loggers": {"uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False}},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service", description="Serve the models in a model repository.")
    parser.add_argument("--models-dir", type=Path, help="model repository (default: models, or CONVSERVE_MODELS_DIR)")
    parser.add_argument("--host", help="interface to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default: 8000)")
    parser.add_argument("--grpc-port", type=int, help="gRPC port (default: 8001; 0 disables gRPC)")
    parser.add_argument("--runtime", choices=["onnx", "tensorflow"], help="model backend (default: onnx)")
    parser.add_argument("--workers", help="worker processes: auto (one per usable CPU, the default) or a number")
    parser.add_argument("--inference-threads", type=int, help="intra-op threads per model (0: per the workers)")
    parser.add_argument("--log-level", help="debug, info, warning, error or critical")
    return parser.parse_args(argv)


class Server(uvicorn.Server):
    """uvicorn's server (graceful shutdown: stop accepting, wait for in-flight requests), failing readiness
    first and, with a shutdown delay, still accepting for that long."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, shutdown_delay: float = 0.0) -> None:
        super().__init__(config)
        self.app = app
        self.shutdown_delay = shutdown_delay
        self._close_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.app.state.ready = False
        if self.shutdown_delay > 0 and self._close_at is None:  # a second signal stops waiting
            self._close_at = time.monotonic() + self.shutdown_delay
            logging.getLogger("uvicorn.error").info(
                "Received signal %d: readiness fails; still accepting for %g s", sig, self.shutdown_delay)
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._close_at is not None and time.monotonic() >= self._close_at:
            self.should_exit = True
        return await super().on_tick(counter)


def refuse(problem: str) -> NoReturn:
    """Stop the start with one line a user can act on, not a traceback (exit status 2)."""
    print(f"error: {problem}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:  # one line a user can act on, not a traceback
        problems = "; ".join(dict.fromkeys(  # a union field (auto or a number) reports once per member
            f"CONVSERVE_{str(e['loc'][0]).upper() if e['loc'] else 'SETTINGS'}: "
            f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors()))
        refuse(f"invalid settings: {problems}")
    if not settings.models_dir.is_dir():  # a typo or a missing volume, not a repository with no model yet
        problem = "is not a directory" if settings.models_dir.exists() else "does not exist"
        refuse(f"invalid settings: CONVSERVE_MODELS_DIR: {settings.models_dir} {problem}")
    if (problem := runtime_problem(settings.runtime)) is not None:
        refuse(f"CONVSERVE_RUNTIME={settings.runtime}: {problem}")
    if (problem := tracing.problem(settings)) is not None:
        refuse(problem)
    if settings.state_url:
        # Once, before any worker starts: the schema is created (or checked) by one process, and a store
        # that cannot be used stops the start with its reason.
        store = StateStore(settings.state_url)
        try:
            store.open()
        except StateStoreError as exc:
            refuse(f"CONVSERVE_STATE_URL: {exc}")
        finally:
            store.close()
    try:
        grpc_claim = grpc_api.claim_port(settings)  # before any worker: theirs bind beside it, no one else's can
    except OSError as exc:
        refuse(f"CONVSERVE_GRPC_PORT: {exc.strerror}")
    try:
        sys.exit(serve(settings))
    finally:
        for sock in grpc_claim:
            sock.close()


def serve(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT, in one process or with workers; the exit status."""
    if settings.worker_count > 1:
        return workers.serve(settings, UVICORN_LOG_CONFIG)
    app = create_app(settings, freeze_startup=True)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                            log_config=UVICORN_LOG_CONFIG, access_log=False, server_header=False,
                            http=ServiceHttpProtocol, limit_concurrency=settings.max_connections,
                            timeout_graceful_shutdown=settings.drain_seconds)
    server = Server(config, app, settings.shutdown_delay_seconds)
    # After its graceful shutdown uvicorn re-raises the signal into the handler that was there before it
    # started; with the default one a drained process would still die of SIGTERM (exit status 143).
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    except KeyboardInterrupt:  # Ctrl-C, re-raised the same way
        pass
    return 0 if server.started else 3  # 3: uvicorn's startup-failure status


if __name__ == "__main__":
    main()
