# The two commands that work on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
export HF_HUB_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

# Re-run when the dependencies change. The tests build the demo crawl, so setup installs the demo
# extra too. From Debian, where there is apt and root: Fashion-MNIST (without it the demo goes on
# without that domain) and Chromium (the report's screenshot and its rendering test; without it
# that one test is skipped).
DEBIAN_PACKAGES := $(if $(wildcard /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz),,dataset-fashion-mnist) \
	$(if $(shell command -v chromium),,chromium)
$(STAMP): pyproject.toml Makefile
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null && [ -n "$(strip $(DEBIAN_PACKAGES))" ]; then \
		echo "installing from Debian: $(strip $(DEBIAN_PACKAGES))"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_PACKAGES) >/dev/null) \
			|| echo "Debian packages could not be installed ($(strip $(DEBIAN_PACKAGES))): the demo goes on without Fashion-MNIST, the report without its screenshot test"; \
	fi
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev,demo]' 2>&1 | grep -v '^WARNING: Location' ; test $${PIPESTATUS[0]} -eq 0
	# animal-mnist declares tensorflow as a dependency it does not need for its data files.
	$(BIN)/python -m pip install -q --no-deps animal-mnist==0.4 2>&1 | grep -v '^WARNING: Location' ; test $${PIPESTATUS[0]} -eq 0
	@touch $(STAMP)

demo: setup
	$(BIN)/webdistill demo

# Lint only: `ruff format` is not adopted (it would rewrite every file's hand layout); the rules
# are in pyproject.toml. CI runs `make test`, so both the lint and the whole suite gate a merge.
lint: setup
	$(BIN)/ruff check .

# Two workers, one test file each (module fixtures are built once); the slowest tests are listed, to
# keep CI short.
test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25 tests

# Everything but the tests marked slow (end-to-end flows, fault injection, torchrun jobs, fuzzing).
test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: setup
	$(BIN)/python bench/ingest_throughput.py
	$(BIN)/python bench/embed_throughput.py --shards 3 --repeats 3
	$(BIN)/python bench/dedup_1m.py
	$(BIN)/python bench/dedup_blowup.py
	$(BIN)/python bench/dedup_blowup.py --verify pixels --sizes 10000 100000 --repeats 3 1
	$(BIN)/python bench/dedup_blowup.py --repro
	$(BIN)/python bench/score_auroc.py
	$(BIN)/python bench/distill_losses.py
	$(BIN)/python bench/distill_throughput.py
	$(BIN)/python bench/faults.py
	nice -n 10 $(BIN)/python bench/quality.py  # about an hour on two busy cores; results in bench/results/

clean:
	rm -rf $(VENV) workspace demo .pytest_cache
