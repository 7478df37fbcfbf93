# scMMGPT — `make demo` and `make test` set up .venv themselves (once; again only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU build of torch where no GPU is present (a CUDA build is several GB); users with GPUs keep their own build
TORCH_CPU ?= torch==2.13.0

.PHONY: setup demo test test-slow test-gpu train-tiny eval bench bench-jobs bench-paper clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q "torch>=2.2,<3"; \
		else $(BIN)/pip install -q "$(TORCH_CPU)" || $(BIN)/pip install -q --index-url https://download.pytorch.org/whl/cpu "torch>=2.2,<3"; fi; \
	fi
	$(BIN)/pip install -q -e ".[train,dev]"
	@touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/scmmgpt demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-slow: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

test-gpu: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m gpu

# every training stage on the shipped PBMC cells (tiny-cpu config; finished stages in runs/tiny-cpu are reused)
train-tiny: setup
	HF_HUB_OFFLINE=1 $(BIN)/scmmgpt train --config train/configs/tiny-cpu.yaml

# the demo over 3 split / training seeds, with the full dataset-shift suite and a second model per seed trained without
# three cell types (zero-shot on unseen types): per-seed reports in eval_output/seed_*/, mean ± sd and the goal lines
# in eval_output/summary.md (6 trainings: about an hour on 2 cores)
eval: setup
	HF_HUB_OFFLINE=1 $(BIN)/scmmgpt demo --seeds 0 1 2 --output-dir eval_output --no-time-limits --shift-suite full --unseen-types

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) demo_output eval_output build *.egg-info

# peak memory of `scmmgpt embed` / `annotate` on 20k and 200k cells (backed input; ~20 min on 2 cores)
bench-jobs: setup
	mkdir -p benchmarks/results && HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_jobs_scale.py --sizes 20000 200000 --json benchmarks/results/jobs_scale.json

# the same on one million cells (input written 20k cells at a time; ~1.3 GB in the temp folder): cells/s and peak RSS
# of `embed` / `annotate` at flat memory (~20-25 min on 2 quiet cores)
.PHONY: bench-jobs-1m
bench-jobs-1m: setup
	mkdir -p benchmarks/results && HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_jobs_scale.py --sizes 1000000 --json benchmarks/results/jobs_scale_1m.json

# the paper's shapes with random weights, nothing downloaded (scGPT-human encoder, BERT-base Q-Former, a Llama): stage-1 /
# stage-2 (LoRA, QLoRA on CUDA) training steps and the four jobs -> benchmarks/results/paper_shape.json. CPU: 1 step,
# batch 2, 256 genes, a small LLM (~1.5 min on 2 cores); CUDA: Llama-2-7B (>= 40 GB), official and largest batches
bench-paper: setup
	mkdir -p benchmarks/results && HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_paper_shape.py
