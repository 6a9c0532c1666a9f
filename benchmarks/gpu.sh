#!/usr/bin/env bash
# plpost vs TRL vs a raw torch loop on one GPU (preset gpu-0.5b, ~0.37B Llama, bf16-mixed, batch 8,
# sequences up to 1024 tokens): SFT, reward modelling and DPO x 3 frameworks, then the chunked
# log-prob memory check and an FSDP smoke of each plpost stage. Budget: ~8 minutes on one H100;
# runs that would start past the deadline (DEADLINE_S, default 420 s) are reported as skipped.
# Writes the JSON, logs/ and RESULTS.md (the markdown tables) under $OUT if set, else benchmarks/results.
#
# Python packages it needs beyond the GPU image (which already has torch, accelerate, peft,
# torchmetrics, tokenizers, safetensors, huggingface-hub, pyarrow, pandas, xxhash, fsspec,
# aiohttp, psutil, numpy, jinja2) -- all pure Python wheels:
#   transformers==5.24.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 lightning==2.6.6
# Fetch them where pip has network (multiprocess's wheel is tagged per Python; the image has 3.12):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     transformers==5.24.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 lightning==2.6.6
# and carry the folder (WHEELS, default .whl): this script installs it into /tmp/site, offline.
#
# Usage: PLPOST_GIT_SHA=$(git rev-parse --short=12 HEAD) bash benchmarks/gpu.sh [run.py flags, e.g. --steps 8]
# (the sha is recorded in the results; a copy of the tree without .git cannot look it up itself)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled

WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 - <<'EOF'
import importlib, importlib.metadata as m, importlib.util
names = ["torch", "transformers", "lightning", "trl", "accelerate", "datasets", "psutil"]
print({n: m.version(n) if importlib.util.find_spec(n) else "MISSING" for n in names})
for module in ("plpost.modules.dpo", "plpost.modules.reward", "plpost.data.preference", "trl"):
    try:  # a missing package fails its runs (each reported in the table); say so up front
        importlib.import_module(module)
    except Exception as error:
        print(f"cannot import {module}: {error!r}")
EOF
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv || true

python3 benchmarks/run.py --preset gpu-0.5b --deadline-s "${DEADLINE_S:-420}" "$@"
