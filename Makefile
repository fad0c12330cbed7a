# Set-up is part of every target: the first run creates .venv and installs tinygpt into it. The demo needs
# the package alone (chat included); testing, linting and benchmarking add the `dev` extra on top.
VENV ?= .venv
PY := $(VENV)/bin/python
# Where no NVIDIA driver is present, pin the CPU build: an unpinned torch pulls a multi-GB CUDA build.
# Override with `make TORCH=torch` (or any spec) on a GPU machine.
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
PYTEST_ARGS ?=

.PHONY: setup setup-dev demo test test-slow llama-cpp bench bench-gpu lint clean

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

DEMO_QUESTIONS := Hello|what is 2 plus 3?|what is 13 plus 5?|what is the capital of France?|reverse the word tiger|say stone twice|What is AI?|Tell me a joke

# Each question starts a fresh conversation (/reset), as in training, where conversations are short.
demo: setup
	$(VENV)/bin/tinygpt train --out runs/demo --overwrite
	@printf '%s\n' "$(DEMO_QUESTIONS)" | tr '|' '\n' > runs/demo/questions.txt
	@sed 's|$$|\n/reset|' runs/demo/questions.txt | $(VENV)/bin/tinygpt chat --run runs/demo \
		| grep -v '^(conversation cleared)$$' > runs/demo/replies.txt
	@echo "--- a conversation with the demo model (tinygpt chat --run runs/demo) ---"
	@paste -d '\n' runs/demo/questions.txt runs/demo/replies.txt | awk 'NR % 2 {print "You: " $$0; next} {print "Bot: " $$0}'

# The chat page's test drives a real browser: Debian's chromium, installed here where it is missing
# (the test skips, saying why, where it cannot be).
test: setup-dev
	@command -v chromium >/dev/null 2>&1 || { apt-get install -y -q chromium >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
		|| echo "chromium could not be installed: the chat page's browser test will be skipped"; }
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The slow checks and the benchmarks include the real llama.cpp: llama-cpp-python is source-only on PyPI, and
# building it takes 12 minutes on 2 cores (cmake and a C++ compiler needed; -march=native, so it uses this
# CPU's SIMD); pip caches the wheel, so only the first run pays. Where it cannot be built, its checks and
# benchmark rows skip with the reason.
llama-cpp: setup-dev
	@$(PY) -c "import llama_cpp" 2>/dev/null || $(PY) -m pip install -q llama-cpp-python \
		|| echo "llama-cpp-python could not be built: the llama.cpp checks and benchmark rows will be skipped"

test-slow: llama-cpp
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# Side-by-side speed against Hugging Face transformers and llama.cpp; timings, so never part of `make test`.
bench: llama-cpp
	$(PY) bench/run_all.py $(BENCH_ARGS)

# The GPU check (bench/gpu.py, docs/benchmarks.md): on one NVIDIA GPU, under 8 minutes; nanoGPT's row needs
# its source in bench/.cache/nanoGPT. BENCH_ARGS=--quick for a first try, --smoke for the CPU dry run.
bench-gpu: setup-dev
	$(PY) bench/gpu.py $(BENCH_ARGS)

lint: setup-dev
	$(VENV)/bin/ruff check src tests bench docs
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache
