# The README's two commands: `make demo` and `make test`. Both install into .venv first.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Threads for torch/BLAS on the 2-core machines we target.
export OMP_NUM_THREADS ?= 2
# The suite runs one pytest worker per core (pytest-xdist), each with one thread: two 2-thread workers
# on 2 cores would fight over them. A whole test file runs on one worker (module fixtures built once).
TEST_THREADS ?= 1
TEST_WORKERS ?= auto
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

.PHONY: demo test test-quick install lock bench ui clean

# The stamp is rebuilt whenever requirements.txt or constraints.txt changes. constraints.txt pins every
# package of the tested stack (transitive ones too): a fresh clone installs the very same libraries.
$(VENV)/.installed: requirements.txt constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --progress-bar off -r requirements.txt -c constraints.txt 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	$(BIN)/python -c "import torch, segmentation_models_pytorch, albumentations, pycocotools, dvc, mlflow, iterstrat, xdist, pydensecrf.densecrf"
	touch $@

install: $(VENV)/.installed

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: install
	OMP_NUM_THREADS=$(TEST_THREADS) PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS) tests

# While working: config, data, metrics and the model zoo's build (tests marked quick), about a minute.
test-quick: install
	OMP_NUM_THREADS=$(TEST_THREADS) PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m quick $(PYTEST_ARGS) tests

# Re-pin the stack after changing requirements.txt: a fresh venv, the newest allowed versions, frozen.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --progress-bar off -r requirements.txt 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	{ grep '^#' constraints.txt; .venv-lock/bin/python -m pip freeze; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .venv-lock

bench: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench.run_all

# Prints the URL of the runs table (recipe and headline scores, best CV first), then serves the UI.
ui: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m stages.ui

clean:
	rm -rf data/demo data/masks data/split reports metrics
