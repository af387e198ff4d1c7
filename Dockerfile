# convserve images, one file, two targets:
#
#   docker build -t convserve .                             # `serve` (the default: the last stage)
#   docker build -t convserve-train --target train .        # `train`
#
# serve: ONNX Runtime + FastAPI only (pyproject.toml's base dependencies; no TensorFlow), the bundled
#   models/ at /models, a non-root user, a HEALTHCHECK on /v2/health/ready. Processes and threads: one
#   worker per usable CPU (CONVSERVE_WORKERS=auto) and ONNX Runtime intra-op threads so that workers x
#   threads stay within them; service/settings.py available_cpus() caps the CPUs by the cgroup v2 quota
#   (/sys/fs/cgroup/cpu.max), so `docker run --cpus 4`, compose `cpus:` or a Kubernetes CPU limit sizes both;
#   CONVSERVE_WORKERS and CONVSERVE_INFERENCE_THREADS override them.
#   SIGTERM (docker stop) drains in-flight requests for up to CONVSERVE_DRAIN_SECONDS (20), then exits 0.
# train: TensorFlow + the training package; `python -m training` writes new versions to /models.
#   `docker run --rm -v convserve-models:/models convserve-train train --recipe mnist` needs no other flag:
#   CONVSERVE_MODELS_DIR=/models and CONVSERVE_RUNS_DIR=/runs are the CLI's defaults there.
#
# Dependencies are installed from pyproject.toml with empty stand-in packages, in a layer before the code
# is copied, so editing the code does not reinstall them (the build tree's egg-info goes before the
# uninstall: pip would otherwise find the stand-in there and uninstall nothing).
#
# No registry? scripts/build-base-image.sh builds a Debian bookworm base with debootstrap:
#   docker build --build-arg PYTHON_IMAGE="$(scripts/build-base-image.sh)" -t convserve .

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app
RUN groupadd --system --gid 10001 convserve \
    && useradd --system --uid 10001 --gid convserve --create-home --home-dir /home/convserve \
       --shell /usr/sbin/nologin convserve \
    && mkdir -p /app /models \
    && chown convserve:convserve /models
WORKDIR /app

# ---------------------------------------------------------------------------------------------------------
FROM base AS train
COPY pyproject.toml ./
RUN mkdir -p service training && touch README.md service/__init__.py training/__init__.py \
    && pip install '.[train]' \
    && rm -rf build ./*.egg-info \
    && pip uninstall -y convserve \
    && rm -rf README.md service training
COPY service/ service/
COPY training/ training/
# The bundled versions, so the shared models volume is seeded the same whichever image mounts it first.
COPY --chown=convserve:convserve models/ /models/
# Writable by the user: checkpoints and logs, the keras.datasets download cache, and the state store's directory
# that `refresh` reads the api's SQLite file in (compose mounts volumes on all three; a volume mounted where the
# image has no directory would be owned by root).
RUN mkdir -p /runs /home/convserve/.keras /var/lib/convserve \
    && chown convserve:convserve /runs /home/convserve/.keras /var/lib/convserve
USER convserve
# The CLI's default --models-dir and --runs-dir (the working directory, /app, is not the user's to write).
ENV CONVSERVE_MODELS_DIR=/models \
    CONVSERVE_RUNS_DIR=/runs
VOLUME ["/runs"]
ENTRYPOINT ["python", "-m", "training"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------------------
FROM base AS serve
COPY pyproject.toml ./
# The [tracing] extra (OpenTelemetry SDK + OTLP exporters) is in the image, off until CONVSERVE_TRACING=true.
RUN mkdir -p service && touch README.md service/__init__.py \
    && pip install '.[tracing]' \
    && rm -rf build ./*.egg-info \
    && pip uninstall -y convserve \
    && rm -rf README.md service
COPY service/ service/
COPY --chown=convserve:convserve models/ /models/
# The state store (prediction log, feedback): a SQLite file in a volume of its own, so it outlives the container.
RUN mkdir -p /var/lib/convserve && chown convserve:convserve /var/lib/convserve
USER convserve
ENV CONVSERVE_HOST=0.0.0.0 \
    CONVSERVE_PORT=8000 \
    CONVSERVE_GRPC_PORT=8001 \
    CONVSERVE_MODELS_DIR=/models \
    CONVSERVE_DRAIN_SECONDS=20 \
    CONVSERVE_STATE_URL=sqlite:////var/lib/convserve/convserve.sqlite
VOLUME ["/var/lib/convserve"]
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)"]
CMD ["python", "-m", "service", "--models-dir", "/models", "--host", "0.0.0.0", "--port", "8000"]
