# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3

.PHONY: install demo test test-fast

install:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'

demo: install
	libortho demo

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q tests -m "not slow"
