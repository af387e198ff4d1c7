"""``python -m service``: start the server. Flags override the ``CONVSERVE_*`` settings."""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn

from service.app import create_app
from service.settings import Settings

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
    parser.add_argument("--runtime", choices=["onnx", "tensorflow"], help="model backend (default: onnx)")
    parser.add_argument("--inference-threads", type=int, help="intra-op threads per model")
    parser.add_argument("--log-level", help="debug, info, warning or error")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = Settings(**overrides)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                log_config=UVICORN_LOG_CONFIG, access_log=False, server_header=False,
                timeout_graceful_shutdown=20)


if __name__ == "__main__":
    main()
