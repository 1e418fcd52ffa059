# Two commands on a fresh machine: `make demo` (main job) and `make test` (the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml requirements-dev.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	touch $@

.PHONY: install demo test bench
install: $(VENV)/.installed

demo: install
	$(VENV)/bin/fewstep demo

test: install
	$(PY) -m pytest

bench: install
	$(VENV)/bin/fewstep bench --model gmm
	$(VENV)/bin/fewstep bench --model digits-opt
