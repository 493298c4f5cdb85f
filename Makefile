# Set-up in one command each. Stamp files in .venv make every target fast when nothing changed.
#   make install  .venv with the CPU build of torch and Quill (editable)
#   make test     install + test dependencies, pull the real models, run the whole test suite
#   make run      install, pull SmolLM2, serve it over the OpenAI-compatible HTTP API

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The CPU build, pinned with its local version so pip can never substitute a CUDA wheel. pip finds it
# in its configured wheel directory, or else on PyTorch's CPU index.
TORCH := torch==2.13.0+cpu
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: install test run

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch, sys; sys.exit(torch.__version__ != '2.13.0+cpu')" 2>/dev/null \
		|| $(BIN)/pip install "$(TORCH)" \
		|| $(BIN)/pip install --extra-index-url $(TORCH_CPU_INDEX) "$(TORCH)"
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -e '.[test]'
	touch $@

test: $(VENV)/.installed-test
	$(BIN)/quill pull smollm2 gemma3
	$(BIN)/python -m pytest -q

run: install
	$(BIN)/quill pull smollm2
	@echo "Quill serves SmolLM2 on http://127.0.0.1:8000/v1 (Ctrl-C stops it). From another terminal:"
	@echo "  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\"
	@echo "    -d '{\"model\": \"smollm2\", \"messages\": [{\"role\": \"user\", \"content\": \"Name the capital of France.\"}], \"max_tokens\": 64}'"
	@echo "or any OpenAI client with base_url=http://127.0.0.1:8000/v1 (add \"stream\": true to stream)."
	$(BIN)/quill serve smollm2
