# The two commands of the README: `make demo` and `make test`. Both set up .venv themselves.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
# Not CACHE: make exports command-line variables, and llama-cpp-python's server reads CACHE as a setting.
SHIFU_CACHE ?= $(HOME)/.cache/shifu
export SHIFU_CACHE
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: test test-slow demo demo-models export-tools venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,docs,gguf]'
	touch $@

venv: $(STAMP)

test: $(STAMP) export-tools
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) export-tools
	$(BIN)/python -m pytest -q -m slow

# llama-cpp-python has no Linux wheel on PyPI: pip compiles it once and keeps the wheel in pip's cache.
# Text only (scripts/llama-cpp-text-only.cmake): 3 min 38 s on 2 cores instead of 9 min 6 s.
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE=$(CURDIR)/scripts/llama-cpp-text-only.cmake
$(VENV)/.demo-installed: $(STAMP)
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/pip install -q 'llama-cpp-python[server]==0.3.36'
	touch $@

# llama.cpp's GGUF converter, unpacked once from the llama-cpp-python sdist on PyPI (`shifu export`).
export-tools: $(STAMP)
	$(BIN)/python -m shifu.export --fetch-converter

demo-models: $(STAMP)
	$(BIN)/python scripts/fetch_models.py qwen0.5b
	$(BIN)/python scripts/fetch_models.py --gguf-only qwen1.5b   # the teacher is served from its GGUF

# The downloads (1.6 GB) run while llama-cpp-python compiles: one waits on the network, the other on the CPU.
demo: $(STAMP)
	$(MAKE) -j2 $(VENV)/.demo-installed demo-models export-tools
	$(BIN)/python scripts/demo.py

clean:
	rm -rf runs/demo
