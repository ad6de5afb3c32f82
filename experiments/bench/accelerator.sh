#!/usr/bin/env bash
# The accelerator check, run once on a lent GPU (the `device` tool): installs the wheels the bare
# GPU machine lacks from the carried folder, then the JAX meta-step at paper scale and the PyTorch
# reference step on the same GPU, one JSON line each, into $OUT/accelerator.jsonl.
#
# Prepare here (CPU), once:   bash experiments/bench/accelerator.sh --fetch-wheels
#   (downloads ml-collections and its pure-Python dependencies into .wheels/, ignored by git)
# Run there:   device run --carry .wheels -- bash experiments/bench/accelerator.sh
# Rehearse here:  D2AM_REHEARSE=1 bash experiments/bench/accelerator.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
py="${PYTHON:-python3}"   # the GPU machine's python3 has jax; here: PYTHON=.venv/bin/python
if [[ "${1:-}" == "--fetch-wheels" ]]; then
  # For the GPU machine's Python 3.12 on x86-64, whatever this machine runs.
  "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 -d .wheels ml-collections absl-py PyYAML
  exit 0
fi
out="${OUT:-/tmp/accelerator}"
mkdir -p "$out"
if [[ -d .wheels ]]; then "$py" -m pip install -q --no-deps --no-index .wheels/*.whl || true; fi
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
if [[ -n "${D2AM_REHEARSE:-}" ]]; then
  size=(--resolution 32 --width 0.125 --steps 2 --warmup 1 --budget-s 60)
  torch_size=(--resolution 32 --per-domain-batch 8 --width 0.125 --steps 2 --warmup 1)
else
  size=(--budget-s 330)
  torch_size=(--resolution 256 --per-domain-batch 8 --width 1.0 --steps 5 --warmup 2)
fi
timeout 400 "$py" experiments/bench/accelerator.py "${size[@]}" | tee "$out/accelerator.jsonl"
if "$py" -c "import torch" 2>/dev/null; then
  for order in second first; do
    timeout 60 "$py" experiments/bench/meta_step_torch.py "${torch_size[@]}" --order "$order" \
      --device "$("$py" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")" \
      | tee -a "$out/accelerator.jsonl" || echo '{"failed": "torch", "order": "'"$order"'"}'
  done
else
  echo '{"skipped": "torch", "reason": "torch is not installed here"}' | tee -a "$out/accelerator.jsonl"
fi
