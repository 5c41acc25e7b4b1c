# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   - the main job on embedded defaults (local Ray, synthetic scenes, local storage, local MLflow)
#   make test   - the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install

install: $(VENV)/.installed

# torch is installed first and pinned: 2.13.0 is the CPU build these machines carry locally; letting pip pick
# torch itself would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: install
	$(VENV)/bin/concerto-ray demo

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q
