# Two commands do all set-up on a fresh machine:
#   make run   -> python -m algos.run algo=flow_dppo on the embedded digits task
#   make test  -> the test suite
# Both create the virtual environment .venv on first use.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch is pinned first so pip takes the CPU wheel where one is on disk; on a CUDA machine
# install torch for your CUDA version into .venv before `make` (see README).
TORCH  ?= torch==2.13.0
ARGS   ?=

.PHONY: run test venv bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,sd3]"
	touch $@

venv: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m algos.run algo=flow_dppo $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q $(ARGS)

bench: $(VENV)/.installed
	$(PY) -m algos.bench quick

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
