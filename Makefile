# pql-pipeline. The two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install stack stack-down stack-status test test-fast demo bench chaos chaos-cluster clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,rocksdb]'
	@touch $(STAMP)

stack: install
	@deploy/stack.sh up

stack-down:
	@deploy/stack.sh down

stack-status:
	@deploy/stack.sh status

# The whole suite: tests/unit/ (two processes: CPU-bound, no services), then tests/stack/, one at a
# time, which starts its own Kafka and Redis on separate ports (see tests/conftest.py).
test: install
	$(BIN)/pytest -q -n 2 --durations=10 tests/unit
	$(BIN)/pytest -q --durations=30 tests/stack

# The unit half: tests/unit/, no services.
test-fast: install
	$(BIN)/pytest -q -n 2 tests/unit

demo: stack
	$(BIN)/python -m streams.tools.demo

bench: stack
	$(BIN)/python -m benchmarks.run

# Two workers under faults for 4 minutes per seed, against their own Kafka and Redis (about 12 min
# per seed); results: benchmarks/RELIABILITY.md. The defaults are the reported runs' settings (rules
# `settle: 2s`, each worker restarted under its own PQL_INSTANCE_ID). CHAOS_ARGS="--seeds 4" etc.
CHAOS_ARGS ?= --seeds 1 2 3 --duration 240 --settle 2s --static
chaos: install
	$(BIN)/python -m benchmarks.chaos $(CHAOS_ARGS)

# The same on a three-node Kafka cluster (replication 3, min ISR 2): nodes SIGKILLed one at a time
# and a rolling restart instead of the broker restart.
chaos-cluster: install
	$(BIN)/python -m benchmarks.chaos $(CHAOS_ARGS) --cluster

clean: stack-down
	rm -rf .stack $(VENV) *.egg-info
