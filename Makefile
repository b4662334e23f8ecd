# Each target installs only when needed: .venv/.installed is newer than pyproject.toml once done.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run lint test bench

install: $(STAMP)

# torch first, pinned, and only if .venv has none: a torch already there (a GPU user's, or PyTorch's
# CPU wheel from https://download.pytorch.org/whl/cpu) is kept, and `pip install lightning` alone
# would pull whatever torch it likes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .[dev]
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m ponder_lightning fit --config configs/adaponderlm.yaml --config configs/demo.yaml

# ruff: settings in pyproject.toml ([tool.ruff])
lint: $(STAMP)
	$(BIN)/ruff format --check . && $(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.train_throughput
