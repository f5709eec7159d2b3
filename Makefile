# Two entry points, each doing its own set-up in ./.venv (offline-safe: the CPU torch wheel is
# installed first, pinned, so nothing pulls a CUDA build).
VENV ?= .venv
PY := $(VENV)/bin/python
THREADS ?= 1

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[gemma,dev]"
	touch $@

demo: setup
	$(VENV)/bin/steerlin demo --threads $(THREADS)

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
