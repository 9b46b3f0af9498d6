# One-command entry points. `make demo` and `make test` set up a virtual environment
# (.venv) on first use and run; nothing else needs to be installed first.
# TORCH_SPEC picks the torch to install (default: the 2.13.0 CPU build; on a GPU machine
# use e.g. `make test TORCH_SPEC=torch`). The package itself only requires torch>=2.4.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,triton
PYTEST_ARGS ?=

.PHONY: setup demo test bench info mutation clean

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

# Mutation testing of the ops' reference/chunked code and the codebook (see docs/testing.md).
# MUTATION_GROUPS picks groups (default: all); mutmut runs on copies under mutants/.
MUTATION_GROUPS ?=
mutation: setup
	$(VENV)/bin/python -c "import mutmut" 2>/dev/null || $(VENV)/bin/python -m pip install -q -e ".[mutation]"
	$(VENV)/bin/python tests/mutation.py $(MUTATION_GROUPS)

clean:
	rm -rf $(VENV) build dist *.egg-info
