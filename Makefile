# One-command entry points. `make demo` and `make test` set up a virtual environment
# (.venv) on first use and run; nothing else needs to be installed first.
# TORCH_SPEC picks the torch to install (default: the 2.13.0 CPU build; on a GPU machine
# use e.g. `make test TORCH_SPEC=torch`). The package itself only requires torch>=2.4.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,triton
PYTEST_ARGS ?=

.PHONY: setup demo test bench info clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(VENV)/bin/vqkernels demo

test: setup
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/vqkernels bench --quick

info: setup
	$(VENV)/bin/vqkernels info

clean:
	rm -rf $(VENV) build dist *.egg-info
