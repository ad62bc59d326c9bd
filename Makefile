# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of this version lies on the project's machines; GPU nodes bring their own torch.
TORCH ?= torch==2.13.0

.PHONY: env demo test clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: env
	$(BIN)/vpmoe demo --out demo

test: env
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) demo
