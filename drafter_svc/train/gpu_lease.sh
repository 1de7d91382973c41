#!/usr/bin/env bash
# One accelerator lease (the `device` tool) of `dspark train online`, as the thirtieth session ran it:
#   stage 1: one run per learning rate in LRS, side by side on one GPU, each continuing the committed
#            drafter on every archived answer (data/answers/) for SECONDS_EACH seconds, with held-out
#            τ_prob at the start, the end and each interpolation α with the start;
#   stage 2: (THEN_SECONDS > 0) the best stage-1 run by held-out τ_prob continued alone at THEN_LR.
# The weights of two runs (the last two stage-1 runs, or the best one and stage 2's) come back in
# 16-bit, in files under the tool's 16 MiB limit; `run_smollm2.sh
# online-import` rebuilds the runs here. Getting the target there: the tree may hold 64 MiB a call and
# carried paths are replaced at every call, so the GGUF goes in parts (.gpu/a, .gpu/b, see
# docs/TRAINING.md), each call copying its part to $STASH (/tmp survives between calls while warm).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
S=${STASH:-/tmp/stash}; DEVICE=${DEVICE:-cuda}; ANSWERS=${ANSWERS:-data/answers/s*/*/}
SECONDS_EACH=${SECONDS_EACH:-420}; LRS=${LRS:-3e-4 1e-3}; BATCH=${BATCH:-32}
THEN_SECONDS=${THEN_SECONDS:-0}; THEN_LR=${THEN_LR:-3e-4}; HELDOUT_LIMIT=${HELDOUT_LIMIT:-0}
INIT=${INIT:-models/dspark-smollm2-135m}; G=/tmp/target.gguf; PY=${PY:-python3}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{
if [[ -z ${MODEL:-} ]]; then
  cat $S/gguf.part0 $S/gguf.part1 $S/gguf.part2 > $G
  echo "gguf md5 $(md5sum < $G | cut -c1-32) (want a1231443440b107ff29f02bdb38c9d0a)"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $S/*.whl || exit 1
fi
MODEL=${MODEL:-$G}
nvidia-smi -L 2>/dev/null; $PY -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available())"
mkdir -p runs/gpu
online() {  # online OUT_NAME INIT LR SECONDS [args...]
  $PY -m dspark_common.cli train online --model "$MODEL" --answers "$ANSWERS" --init-from "$2" \
    --draft-vocab "$2" --device "$DEVICE" --tf32 --batch-seqs "$BATCH" --lr "$3" --seconds "$4" --save-every 60 \
    --threads 4 --out "runs/gpu/$1" "${@:5}" > "runs/gpu/$1.log" 2>&1
}
pids=()
for lr in $LRS; do online "lr$lr" "$INIT" "$lr" "$SECONDS_EACH" --heldout-limit "$HELDOUT_LIMIT" & pids+=($!); done
wait "${pids[@]}"  # not a bare wait: it would wait for this block's tee too
for lr in $LRS; do tail -n 1 "runs/gpu/lr$lr.log"; done
runs=$(for lr in $LRS; do echo "lr$lr"; done)
if (( THEN_SECONDS > 0 )); then
  best=$($PY -c "
import json, sys
print(max(sys.argv[1:], key=lambda r: json.load(open(f'runs/gpu/{r}/online.json'))['heldout_tau_by_alpha']['1.0']))" $runs)
  $PY -m dspark_common.cli train export --run "runs/gpu/$best" --out runs/gpu/best_export --dtype float32 --verify-with ''
  online then runs/gpu/best_export "$THEN_LR" "$THEN_SECONDS" --heldout-limit "${THEN_HELDOUT_LIMIT:-1200}" --alphas 1.0
  tail -n 1 runs/gpu/then.log
  runs="$best then"  # the tool returns 64 MiB at most: two drafters
fi
$PY - "$OUT" $runs <<'PY'
import sys, torch
from safetensors.torch import save_file
out, runs = sys.argv[1], sys.argv[2:]
for run in runs:
    state = torch.load(f"runs/gpu/{run}/state/training_state.pt", map_location="cpu", weights_only=False)
    half = {n: state["model"][n].to(torch.bfloat16).contiguous() for n in sorted(state["model"])}
    parts, part, size = [], {}, 0
    for n, t in half.items():  # files under the tool's 16 MiB each
        if part and size + t.numel() * 2 > 15 * 2**20:
            parts.append(part); part, size = {}, 0
        part[n], size = t, size + t.numel() * 2
    parts.append(part)
    for i, p in enumerate(parts):
        save_file(p, f"{out}/{run}_w{i}.safetensors", metadata={"step": str(state["step"])})
PY
tar czf "$OUT/runs.tgz" --exclude='*.pt' --exclude='*.tmp' --exclude='best_export' runs/gpu
ls -la "$OUT"
} 2>&1 | tee "$OUT/lease.log"
