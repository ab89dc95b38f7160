# One gate, run the same everywhere: `make check` is what CI runs (.ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SRC := reward_router reward_router_cli gateway services trainer_client tests benchmarks

.PHONY: setup lint format format-check types imports test test-slow check demo replay bench bench-load bench-faults clean

setup: $(STAMP)

# torch is installed first with its CPU pin so that nothing later pulls a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[train,dev]'
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check $(SRC)

format:
	$(VENV)/bin/ruff format $(SRC)
	$(VENV)/bin/ruff check --fix $(SRC)

format-check: setup
	$(VENV)/bin/ruff format --check $(SRC)

types: setup
	$(VENV)/bin/mypy reward_router reward_router_cli gateway services trainer_client

# Who may import whom: the contracts in pyproject.toml ([tool.importlinter], docs/architecture.md).
imports: setup
	$(VENV)/bin/lint-imports --no-cache

test: setup
	$(PY) -m pytest -m "not slow" -q

test-slow: setup
	$(PY) -m pytest -m slow -q

check: lint format-check types imports test

# The main job: the whole cluster on this machine and a short Online DPO run through it; a report
# folder under reports/ (docs/demo.md). Cached models, RMs and router make later runs faster.
demo: setup
	$(VENV)/bin/reward-router demo

# Replay evaluation of every policy on the shipped real reward-model outputs.
replay: setup
	$(VENV)/bin/reward-router replay --pairs data/pairs/judgebench.jsonl.gz \
		--behavior data/rm_outputs/judgebench.jsonl.gz --policies all --folds 5 --seeds 5 \
		--json results/replay-judgebench.json --plot results/replay-judgebench.png
	$(VENV)/bin/reward-router replay --pairs data/pairs/rewardbench-math-prm.jsonl.gz \
		--behavior data/rm_outputs/rewardbench-math-prm.jsonl.gz --policies all --folds 5 --seeds 5 \
		--json results/replay-rewardbench-math-prm.json --plot results/replay-rewardbench-math-prm.png
	$(VENV)/bin/reward-router replay --pairs data/pairs/pool-heldout.jsonl.gz \
		--behavior data/rm_outputs/pool-heldout.jsonl.gz --policies all --folds 5 --seeds 5 \
		--max-length 128 --needs-reference verifier \
		--json results/replay-pool-heldout.json --plot results/replay-pool-heldout.png

bench: setup
	$(PY) benchmarks/bench_routing_core.py

# docs/reliability.md: 60 s at a fixed rate against two replicas; every fault scenario.
bench-load: setup
	$(PY) benchmarks/bench_load.py

bench-faults: setup
	$(PY) benchmarks/bench_faults.py --scenario all

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
