#!/usr/bin/env bash
# The performance report's benchmark, end to end: starts the stack (`dspark up`, committed drafter),
# runs every configuration over HTTP, stops the stack, runs the in-process peers (transformers
# generate(), prompt lookup, our DecodeLoop), then copies the figures to docs/img/ and rewrites the
# generated section of docs/PERFORMANCE.md (between its bench:results markers; the rest stays).
#
#   bench/run_report.sh                          # the full matrix (hours on a quiet 2-core CPU)
#   LIMIT=5 MAX_NEW=64 bench/run_report.sh       # smaller, when time is short
#   CONCURRENCY=1 TEMPS=0 bench/run_report.sh    # only the headline (greedy, one user)
#
# Headline (must hold with the committed drafter): greedy, concurrency 1, 128 new tokens, first 20
# prompts of gsm8k, humaneval and mbpp -> speedup over draft length 0 >= 1.5x, ahead of prompt lookup.
set -euo pipefail
cd "$(dirname "$0")/.."

LIMIT=${LIMIT:-20}                  # first N prompts of each dataset
MAX_NEW=${MAX_NEW:-128}             # new tokens per request
CONCURRENCY=${CONCURRENCY:-1,4,8}   # concurrent users (HTTP runs)
TEMPS=${TEMPS:-0,1}                 # temperatures (HTTP runs); 0 = greedy
DRAFT=${DRAFT:-0,auto}              # draft lengths; e.g. 0,auto,4 adds a fixed length
BASELINES=${BASELINES:-hf,prompt-lookup,inprocess}   # '' skips the in-process peers
BASELINE_TEMPS=${BASELINE_TEMPS:-0} # temperatures of the peers (concurrency 1)
PL_TOKENS=${PL_TOKENS:-10}          # prompt_lookup_num_tokens
CHECKPOINT=${CHECKPOINT:-default}   # the drafter: 'default' = models/dspark-smollm2-135m
EVAL=${EVAL:-/work/shared/data/prompts/eval}
OUT=${OUT:-runs/bench-$(date -u +%Y%m%dT%H%M%SZ)}
DOC=${DOC:-docs/PERFORMANCE.md}    # the generated section of this file is rewritten
IMG=${IMG:-docs/img}                # figures are copied here as bench_*.png (linked from DOC as img/)
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1            # one torch thread per process: more spin against each other here

DATASETS=("$EVAL/gsm8k-tail319.jsonl" "$EVAL/humaneval.jsonl" "$EVAL/mbpp.jsonl")
if [[ "$CHECKPOINT" == default && ! -f models/dspark-smollm2-135m/config.json ]]; then
  echo "warning: no committed drafter in models/dspark-smollm2-135m: the stack drafts with a RANDOM drafter" >&2
fi
n_c=$(tr ',' '\n' <<<"$CONCURRENCY" | grep -c .)
n_t=$(tr ',' '\n' <<<"$TEMPS" | grep -c .)
n_d=$(tr ',' '\n' <<<"$DRAFT" | grep -c .)
echo "HTTP: $((3 * LIMIT * n_c * n_t * n_d)) requests of up to $MAX_NEW tokens; results in $OUT" >&2
echo "machine: $(env -u OMP_NUM_THREADS nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), load $(cut -d' ' -f1-3 /proc/loadavg)" >&2

args=(bench --start --up-args "--checkpoint $CHECKPOINT"
      --dataset "${DATASETS[@]}" --limit "$LIMIT" --max-new-tokens "$MAX_NEW"
      --concurrency "$CONCURRENCY" --temperature "$TEMPS" --draft-length "$DRAFT" --out "$OUT")
if [[ -n "$BASELINES" ]]; then
  args+=(--baselines "$BASELINES" --baseline-temperature "$BASELINE_TEMPS"
         --prompt-lookup-tokens "$PL_TOKENS" --drafter "$CHECKPOINT")
fi
(set -x; "$PY" -m dspark_common.cli "${args[@]}")

mkdir -p "$IMG"
for f in "$OUT"/*.png; do cp "$f" "$IMG/bench_$(basename "$f")"; done
"$PY" -m bench.report "$OUT/results.json" --doc "$DOC" --img-dir img --img-prefix bench_
echo "updated $DOC and $IMG/bench_*.png from $OUT/results.json" >&2
