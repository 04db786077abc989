# One-command entry points. `make serve` and `make test` are what the README promises.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 5001
THREADS ?= 16
# The torch this project installs first; set TORCH_SPEC= to keep yours. Which build it is depends on
# where pip finds it: the CI machines' wheel store has the CPU build, while PyPI's Linux wheel of this
# version carries CUDA. TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU build from there.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

# The oldest transformers the engine supports (the GPU machine's), for `make test-compat`.
COMPAT_VENV ?= .venv-compat
COMPAT_TRANSFORMERS ?= transformers==5.17.0

.PHONY: install serve demo test test-slow test-compat bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); fi
	$(PY) -m pip install -q -e ".[serve,test]"
	touch $@

install: $(VENV)/.installed

# Serve score.py on http://127.0.0.1:$(PORT)/score with several request threads in one worker,
# so that the micro-batcher can gather rows from concurrent requests.
serve: install
	AML_APP_ROOT=$(CURDIR) GUNICORN_CMD_ARGS="--threads $(THREADS)" $(VENV)/bin/azmlinfsrv --entry_script score.py --port $(PORT)

# The same, with the toy demo model shipped in blip2/demo_model (offline, CPU friendly).
demo: install
	AML_APP_ROOT=$(CURDIR) BLIP2_MODEL=demo GUNICORN_CMD_ARGS="--threads $(THREADS)" $(VENV)/bin/azmlinfsrv --entry_script score.py --port $(PORT)

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-slow: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

# The engine side of the suite on $(COMPAT_TRANSFORMERS), without the Azure inference server
# (as on a GPU machine): the tests that need azmlinfsrv or the test-only tools skip.
$(COMPAT_VENV)/.installed: pyproject.toml Makefile
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(COMPAT_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(COMPAT_VENV)/bin/python -m pip install -q -e ".[engine]" "$(COMPAT_TRANSFORMERS)" "pytest>=8" "hypothesis>=6.100"
	touch $@

test-compat: $(COMPAT_VENV)/.installed
	HF_HUB_OFFLINE=1 BLIP2_TESTS_ENGINE_ONLY=1 $(COMPAT_VENV)/bin/python -m pytest -q

# The CPU benchmarks (each prints a ratio against its baseline); see bench/RESULTS.md.
bench: install
	$(PY) bench/preprocess.py
	$(PY) bench/cache.py
	$(PY) bench/serve.py
	$(PY) bench/cpu_path.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .pytest_cache .hypothesis
