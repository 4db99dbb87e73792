# Everything a fresh machine needs: `make run` and `make test` create the virtualenv and install first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install proto services install-brokers lint typecheck test run check bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,fast]'
	touch $(STAMP)

install: $(STAMP)

# The generated code is committed (so `pip install .` needs no protoc); this rewrites it after a .proto edit.
# tests/test_proto_drift.py fails when the committed copy and the .proto files disagree.
proto: $(STAMP)
	$(PY) scripts/gen_proto.py

services:
	./scripts/services.sh

install-brokers:
	@echo "About to install RabbitMQ, Mosquitto and Redis from Debian packages (needs root): apt-get install -y rabbitmq-server mosquitto redis-server"
	apt-get install -y rabbitmq-server mosquitto redis-server

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: $(STAMP) services lint typecheck
	$(PY) -m pytest

check: $(STAMP)
	$(VENV)/bin/mediator check --config config.toml

run: $(STAMP)
	$(VENV)/bin/mediator run --config config.toml

# The benchmark (about 6-9 minutes on 2 cores; prints one table, writes bench/results.json).
# BENCH_ARGS: e.g. --quick, --rounds 5, --paths http-amqp,mqtt-amqp, --no-peers, --profile (python -m bench --help).
bench: $(STAMP) services
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
