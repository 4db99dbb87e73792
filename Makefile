# Everything a fresh machine needs: `make run` and `make test` create the virtualenv and install first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install proto docs services install-brokers lint typecheck test run check bench flake soak fuzz clean activate

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
	@echo "About to install RabbitMQ, Mosquitto, Redis, PostgreSQL and NATS, and the clients the README's quickstart and its test use (curl, amqp-tools, mosquitto-clients), Chromium for the dashboard tests and Graphviz for docs/images/architecture.png, from Debian packages (needs root): apt-get install -y rabbitmq-server mosquitto redis-server postgresql nats-server curl amqp-tools mosquitto-clients chromium graphviz"
	apt-get install -y rabbitmq-server mosquitto redis-server postgresql nats-server curl amqp-tools mosquitto-clients chromium graphviz

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Two processes (pytest-xdist, a test module per process at a time): most of a test is waiting on sockets,
# daemons and brokers, so two of them share the 2 cores well. TEST_WORKERS=0 runs in this process alone.
TEST_WORKERS ?= 2
test: $(STAMP) services lint typecheck
	$(PY) -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

check: $(STAMP)
	$(VENV)/bin/mediator check --config config.toml

run: $(STAMP)
	$(VENV)/bin/mediator run --config config.toml

# The benchmark (about 20 minutes on 2 cores, the push fan-out and request-reply included; prints one table, writes bench/results.json
# and draws it: docs/images/bench-throughput.png, bench-latency.png).
# BENCH_ARGS: e.g. --quick, --rounds 5, --paths http-amqp,mqtt-amqp, --no-peers, --profile (python -m bench --help).
bench: $(STAMP) services
	$(PY) -m bench $(BENCH_ARGS)
	$(PY) -m bench.push
	$(PY) -m bench.rpc
	$(PY) -m bench.store_query
	$(PY) -m bench.plots

# The flake check (not part of `make test`): the end-to-end and fault directories three times in a row, then
# every test that failed at least once (docs/testing.md). FLAKE_ARGS: e.g. --rounds 5, or test paths.
flake: $(STAMP) services
	nice -n 5 $(PY) scripts/flake.py $(FLAKE_ARGS)

# The soak (docs/testing.md): SOAK_MINUTES (default 30) of mixed load on all four front-ends with a fault every
# 2 minutes, on its own RabbitMQ node, Mosquitto and tmpfs outbox (needs root); prints one `soak:` line.
SOAK_MINUTES ?= 30
soak: $(STAMP)
	SOAK_MINUTES=$(SOAK_MINUTES) nice -n 5 $(PY) -m bench.soak

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
