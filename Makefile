# Everything a fresh machine needs: `make run` and `make test` create the virtualenv and install first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install proto docs services install-brokers lint typecheck test run check bench fuzz clean activate

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,fast]'
	touch $(STAMP)

install: $(STAMP)

# atheris (the `fuzz` extra) only where `make fuzz` runs: a wheel for CPython 3.11 on Linux x86-64.
FUZZ_STAMP := $(VENV)/.fuzz-stamp
$(FUZZ_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev,fast,fuzz]'
	touch $(FUZZ_STAMP)

# The generated code is committed (so `pip install .` needs no protoc); this rewrites it after a .proto edit.
# tests/test_proto_drift.py fails when the committed copy and the .proto files disagree.
proto: $(STAMP)
	$(PY) scripts/gen_proto.py

# docs/config-reference.md from the config models (every key, type, default, description);
# tests/firsthour/test_config_reference.py fails when the committed copy differs.
docs: $(STAMP)
	$(PY) scripts/gen_config_reference.py

# `mediator` is installed in the virtualenv, not on PATH: this prints the line that puts it there.
activate: $(STAMP)
	@echo "source $(VENV)/bin/activate    # then: mediator --help (or call $(VENV)/bin/mediator directly)"

services:
	./scripts/services.sh

install-brokers:
	@echo "About to install RabbitMQ, Mosquitto, Redis, PostgreSQL and NATS, and the clients the README's quickstart and its test use (curl, amqp-tools, mosquitto-clients), from Debian packages (needs root): apt-get install -y rabbitmq-server mosquitto redis-server postgresql nats-server curl amqp-tools mosquitto-clients"
	apt-get install -y rabbitmq-server mosquitto redis-server postgresql nats-server curl amqp-tools mosquitto-clients

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

# The benchmark (about 17 minutes on 2 cores, the push fan-out and request-reply included; prints one table, writes bench/results.json).
# BENCH_ARGS: e.g. --quick, --rounds 5, --paths http-amqp,mqtt-amqp, --no-peers, --profile (python -m bench --help).
bench: $(STAMP) services
	$(PY) -m bench $(BENCH_ARGS)
	$(PY) -m bench.push
	$(PY) -m bench.rpc

# Coverage-guided fuzzing (atheris) of every decoder of outside bytes, one target after another, FUZZ_SECONDS
# each (default 600: 80 minutes for the 8 targets); FUZZ_TARGETS=a,b for some (python -m fuzz --help).
# Findings go to var/fuzz/findings/TARGET/; docs/fuzzing.md says what to do with them. Not part of `make test`
# (tests/fuzz_regressions runs the targets on their seeds and on every input found so far).
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?=
fuzz: $(FUZZ_STAMP)
	$(PY) -m fuzz --seconds $(FUZZ_SECONDS) $(if $(FUZZ_TARGETS),--targets $(FUZZ_TARGETS))

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
