# lamemo_ds — the two set-up commands are `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: venv test test-fast demo bench lint clean

venv: $(STAMP)

# torch first (pinned: it resolves to the CPU build on these machines), then the package + test extras.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e '.[test,triton]'
	touch $(STAMP)

# lint-imports first: the folders' one-way dependencies ([tool.importlinter] in pyproject.toml).
# TRITON_INTERPRET=1: the `gpu` tier runs the Triton kernels on CPU through Triton's interpreter
# (Triton fixes interpreter-or-compiler when first imported, so it is set for the whole run; with
# no GPU nothing else uses Triton).
test: $(STAMP)
	$(BIN)/lint-imports
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not slow and not slurm" $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m lamemo_ds.demo

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

lint: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check lamemo_ds tests bench tools
	$(BIN)/ruff format --check lamemo_ds tests bench tools

clean:
	rm -rf $(VENV) .pytest_cache
