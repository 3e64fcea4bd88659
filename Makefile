# The single entry point. `make demo` runs the main job, `make test` the whole suite;
# both set up their own virtualenv (.venv) from nothing but python3.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo-out

.PHONY: setup test-tools demo test test-fast lint bench bench-cluster clean

$(STAMP): pyproject.toml scripts/install_horovod.sh examples/digits_cnn/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch that this machine serves; a looser pin downloads a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# The example app `aicfl demo --dataset digits` trains (examples/digits_cnn), as a device's owner installs it.
	$(BIN)/pip install -q -e examples/digits_cnn
	# Horovod for `aicfl cluster pretrain`: built once from its patched sdist (about 10 minutes
	# on 2 cores), then installed from the cached wheel in seconds.
	bash scripts/install_horovod.sh $(BIN)/python
	touch $(STAMP)

setup: $(STAMP)

# Beyond Python: chromium (the dashboard's browser test) and promtool (the alert rules), from apt if missing.
test-tools:
	bash scripts/install_test_tools.sh

demo: $(STAMP)
	rm -rf $(DEMO_OUT)
	$(BIN)/aicfl demo --devices 6 --rounds 10 --out $(DEMO_OUT)

# With line coverage of the product packages ([tool.coverage] in pyproject.toml): a summary of
# the files not fully covered here, the whole report in htmlcov/index.html.
# Two workers (pytest-xdist), a test module per worker at a time (--dist loadscope: a module's
# coordinator and agents are started once): most of the suite waits on the processes it starts,
# so two at a time fit on two cores.
test: $(STAMP) test-tools
	$(BIN)/pytest -q -n 2 --dist loadscope --durations=25 --cov --cov-report=term-missing:skip-covered --cov-report=html

test-fast: $(STAMP) test-tools
	$(BIN)/pytest -q -n 2 --dist loadscope -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy shared client_agent coordinator server training_cluster

bench: $(STAMP)
	$(BIN)/python bench/aggregate.py
	$(BIN)/python bench/demo_quality.py

bench-cluster: $(STAMP)
	$(BIN)/python bench/pretrain.py
	$(BIN)/python bench/pretrain_phases.py
	$(BIN)/python bench/automl.py
	$(BIN)/python bench/audit.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache htmlcov .coverage .coverage.* test-artifacts
