# The two README commands. Each sets itself up on a fresh machine: a .venv, the CPU
# torch wheel first (an unpinned torch would pull gigabytes of CUDA packages), then
# mimdex with its cpu + dev extras, then `pip check`.
SHELL   := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.mimdex-installed
PYTEST_ARGS ?=

.PHONY: test demo install bench clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0 2>&1 | { grep -v "is ignored" || true; }
	$(PY) -m pip install --quiet -e ".[cpu,dev]" 2>&1 | { grep -v "is ignored" || true; }
	$(PY) -m pip check
	$(PY) -c "import torch, faiss, ray, apache_beam, s3fs, mimdex.pipelines.cli"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/mimdex demo

# Slow checks and benchmarks that CI does not run.
bench: $(STAMP)
	$(PY) -m pytest tests -m "slow" -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo-output .pytest_cache
