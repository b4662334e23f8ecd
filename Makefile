# Each target installs only when needed: .venv/.installed is newer than pyproject.toml once done.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install browser run lint test bench

install: $(STAMP)

# torch first, pinned, and only if .venv has none: a torch already there (a GPU user's, or PyTorch's
# CPU wheel from https://download.pytorch.org/whl/cpu) is kept, and `pip install lightning` alone
# would pull whatever torch it likes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .[dev]
	$(MAKE) --no-print-directory browser
	touch $(STAMP)

# Debian's chromium, for the test that renders `inspect`'s page in a real browser: installed when
# apt-get can (as root); otherwise that one test is skipped and says why. Never fails the install.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends chromium >/dev/null 2>&1; }; }; } || \
	  echo "chromium not installed (needs apt-get as root): tests/test_depth_map.py's browser test will be skipped"

run: $(STAMP)
	$(BIN)/python -m ponder_lightning fit --config configs/adaponderlm.yaml --config configs/demo.yaml

# ruff: settings in pyproject.toml ([tool.ruff])
lint: $(STAMP)
	$(BIN)/ruff format --check . && $(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.train_throughput
