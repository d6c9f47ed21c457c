# distray: `make quickstart` runs the demo pipeline on an embedded local Ray; `make test` runs the suite.
# Both create .venv when it is missing. `make setup` is idempotent: a stamp keyed on the hash of
# pyproject.toml makes it a no-op when nothing changed.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
STAMP := $(VENV)/.setup-$(HASH)
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
EXTRAS := $(if $(HAS_GPU),gpu,cpu),dev
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/distray/torch_extensions
export VLLM_CPU_KVCACHE_SPACE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
PYTEST_ARGS ?=
# `make test` runs on this many pytest-xdist workers (0: one process). Each takes a whole test
# file at a time (module fixtures stay shared) in the order tests/conftest.py sets, slowest
# first; each worker has its own local Ray. Much of an integration test is process start-up
# that leaves a core idle, so two workers on 2 cores finish sooner than one.
PYTEST_WORKERS ?= 2

.PHONY: setup test test-unit quickstart lint typecheck bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	@# pip pulls these in; on CPU they break `import transformers` models (torchvision::nms).
	@if [ -z "$(HAS_GPU)" ]; then $(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true; fi
	@rm -f $(VENV)/.setup-*
	@touch $(STAMP)

test: setup
	$(BIN)/python -m pytest tests -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

quickstart: setup
	$(BIN)/distray run jobs/configs/quickstart.yaml

# The real-checkpoint example (SmolLM2-135M-Instruct → a pruned copy; arms pruned/sft/kd/reverse_kl,
# one report: runs/smollm2-135m_to_pruned_kd/report.md). EXAMPLE_ARGS: e.g. --arms pruned,sft,kd,jsd
.PHONY: example
EXAMPLE_ARGS ?=
example: setup
	$(BIN)/python jobs/example.py --config jobs/configs/smollm2-135m_to_pruned_kd.yaml $(EXAMPLE_ARGS)

lint: setup
	$(BIN)/ruff check distray tests jobs benchmarks
	$(BIN)/mypy distray

# Every benchmark runs even when one fails; the target fails if any did.
bench: setup
	@rc=0; for b in generate train serve; do $(BIN)/python benchmarks/$$b.py || rc=1; done; exit $$rc

clean:
	rm -rf $(VENV) runs .pytest_cache
