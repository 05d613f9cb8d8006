# Two entry points: `make run` (the main job on the embedded default) and `make test`.
# Both create .venv on first use: torch first (the CPU wheel on this machine's disk), then the package.
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= default
export PREFECT_HOME ?= $(CURDIR)/.prefect
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export GX_ANALYTICS_ENABLED := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: run test install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/mtl pipeline --profile $(PROFILE)

test: install
	$(VENV)/bin/python -m pytest -v --durations=15

clean:
	rm -rf prepared tokenized checkpoints reports mlflow.db mlartifacts .prefect
