# The two commands the README promises: `make smoke` (run) and `make test` (tests).
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
CONFIG  ?= configs/smoke.yaml
WORKERS ?= 8

.PHONY: venv smoke test lint format test-fast bench bench-wan image docker-up docker-down clean

# (Re)create the venv whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,orchestrator]'
	touch $@

venv: $(STAMP)

# Validate the config before torchrun starts any process: one error line, exit status 2.
smoke: venv
	$(BIN)/python -m trainer.config $(CONFIG)
	$(BIN)/torchrun --standalone --nproc-per-node=2 -m trainer.worker --config $(CONFIG)

# The lint and format check first: CI runs `make test`, so it runs these too (`make format` fixes).
test: venv lint
	$(BIN)/python -m pytest tests

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Everything but the Docker tests: the inner loop while developing.
test-fast: venv
	$(BIN)/python -m pytest tests -m "not docker"

bench: venv
	@set -e; for f in $$(ls bench/bench_*.py | grep -v bench_wan.py); do echo "== $$f"; $(BIN)/python $$f; done

# DiLoCo over tc-shaped links between worker containers (root, Docker): bench/results/wan.*.
# The default grid takes ~15 min on 2 cores; ARGS="--full" runs every rate and compression at M = 2, 4, 8.
bench-wan: image
	$(BIN)/python bench/bench_wan.py $(ARGS)

image: venv
	bash compose/provision.sh

# `compose up` returns 0 whatever happened; the coordinator's exit status is the run's.
docker-up: image
	COMPOSER_CONFIG=$(CONFIG) docker compose up --scale worker=$(WORKERS)
	@exit $$(docker inspect -f '{{.State.ExitCode}}' $$(docker compose ps -aq coordinator))

docker-down:
	docker compose down --remove-orphans

clean:
	rm -rf $(VENV) runs build *.egg-info
