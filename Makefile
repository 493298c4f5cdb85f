# Set-up in one command each. Stamp files in .venv make every target fast when nothing changed.
#   make install  .venv with the CPU build of torch and Quill (editable)
#   make test     install + test and cluster (Ray Serve) dependencies and Chromium, pull the real models, run the
#                 whole test suite
#   make run      install, pull SmolLM2, serve it over the OpenAI-compatible HTTP API

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The CPU build, pinned with its local version so pip can never substitute a CUDA wheel. pip finds it
# in its configured wheel directory, or else on PyTorch's CPU index.
TORCH := torch==2.13.0+cpu
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: install browser test run

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch, sys; sys.exit(torch.__version__ != '2.13.0+cpu')" 2>/dev/null \
		|| $(BIN)/pip install "$(TORCH)" \
		|| $(BIN)/pip install --extra-index-url $(TORCH_CPU_INDEX) "$(TORCH)"
	$(BIN)/pip install -e .
	touch $@

# The cluster extra (Ray Serve) too: tests/test_deploy.py runs a local Ray Serve deployment.
$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -e '.[test,cluster]'
	touch $@

# The browser tests (tests/test_chat_page.py) drive the system's Chromium through Playwright, which
# downloads no browser of its own. It is installed with apt-get when missing and apt-get can run
# without a password prompt (as root, or with passwordless sudo); otherwise those tests skip and say
# how to install it (.ci/run makes them fail instead). Nothing happens when it is already there.
CHROMIUM_INSTALL := env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

browser:
	@if [ -n "$$QUILL_CHROMIUM" ] || command -v chromium >/dev/null 2>&1 \
	        || command -v chromium-browser >/dev/null 2>&1; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	    echo "No Chromium and no apt-get: the browser tests will skip (set QUILL_CHROMIUM=/path/to/chromium)."; \
	elif [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && $(CHROMIUM_INSTALL); \
	elif sudo -n true 2>/dev/null; then \
	    sudo -n apt-get update -q && sudo -n $(CHROMIUM_INSTALL); \
	else \
	    echo "No Chromium, and installing it needs root: the browser tests will skip (sudo apt-get install chromium)."; \
	fi

test: $(VENV)/.installed-test browser
	$(BIN)/quill pull smollm2 gemma3
	$(BIN)/python -m pytest -q

run: install
	$(BIN)/quill pull smollm2
	@echo "Quill serves SmolLM2 on http://127.0.0.1:8000/v1 (Ctrl-C stops it). From another terminal:"
	@echo "  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\"
	@echo "    -d '{\"model\": \"smollm2\", \"messages\": [{\"role\": \"user\", \"content\": \"Name the capital of France.\"}], \"max_tokens\": 64}'"
	@echo "or any OpenAI client with base_url=http://127.0.0.1:8000/v1 (add \"stream\": true to stream)."
	$(BIN)/quill serve smollm2
