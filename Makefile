# The two commands: `make serve` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
MODELS_DIR ?= models

.PHONY: serve test lint format clean system-deps bench train-deps train

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Serving install: ONNX Runtime + FastAPI and the OpenTelemetry SDK (off until CONVSERVE_TRACING=true), no TensorFlow.
$(VENV)/.serve: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[tracing]'
	touch $@

# Everything the tests use: serving, tracing, training, the TensorFlow runtime and the dev tools.
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev,train,tf,tracing]'
	touch $@ $(VENV)/.serve

# Training install: the serving install plus TensorFlow, Keras, tf2onnx and matplotlib (no dev tools).
$(VENV)/.train: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[train,tracing]'
	touch $@ $(VENV)/.serve

train-deps: $(VENV)/.train

# `make train RECIPE=mnist TRAIN_ARGS='--data-dir ../shared/datasets'`: train, evaluate, gate and publish.
RECIPE ?= mnist
train: $(VENV)/.train
	$(BIN)/python -m training train --recipe $(RECIPE) --models-dir $(MODELS_DIR) $(TRAIN_ARGS)

serve: $(VENV)/.serve
	$(BIN)/python -m service --models-dir $(MODELS_DIR) --host $(HOST) --port $(PORT)

# Debian packages for the end-to-end tests (Prometheus, Chromium + ChromeDriver, docker-compose): installed
# when root (or with passwordless sudo), and the packaged prometheus service is stopped and disabled.
# SKIP_SYSTEM_DEPS=1 skips all of it (the tests that need a missing package skip).
system-deps:
	@bash scripts/install-system-deps.sh

test: $(VENV)/.dev system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Benchmarks (never part of the tests): ours on its defaults vs inline apps and serving frameworks, and under
# overload, on this machine; rewrites docs/benchmarks.md (the load generator, wrk, is one of the system packages).
bench: $(VENV)/.dev system-deps
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check service training tests bench fuzz

format: $(VENV)/.dev
	$(BIN)/ruff format service training tests bench fuzz

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
