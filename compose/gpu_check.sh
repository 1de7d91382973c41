#!/usr/bin/env bash
# The GPU check in one call: a real drafter and a real verifier gRPC service on CUDA around tiny
# random models (bench/gpu_check.py), greedy speculation vs draft length 0 token-identical, and
# decode tokens/s — once per dtype (float32, then bfloat16). Exit 0 = every run was lossless.
#
#   bash compose/gpu_check.sh                    # on a GPU machine (CUDA)
#   bash compose/gpu_check.sh --device cpu       # the same check on the CPU (float32 only)
#   DTYPES=bfloat16 bash compose/gpu_check.sh --new-tokens 128 --concurrency 32
#   bash compose/gpu_check.sh --fetch-wheels     # here, before a run on a machine without PyPI
#
# Results: one JSON per dtype, gpu_check-<dtype>.json, in $OUT (when set) or /tmp.
#
# Python: $PYTHON, else .venv/bin/python, else python3. A machine that cannot reach PyPI (the
# device machines this project is lent have PyTorch and transformers but not every dependency)
# gets the missing ones as wheels: `--fetch-wheels` downloads them here into .whl/ (CPython 3.12,
# manylinux x86-64; PY_VERSION=3.11 for another interpreter), and a run finding .whl/ installs
# them into a private folder on PYTHONPATH first. With the device tool: carry [".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS_DIR=.whl
# What bench/gpu_check.py imports beyond torch/transformers/safetensors/numpy, pinned to the
# versions of this checkout's environment when it has one.
WHEEL_PACKAGES="grpcio grpcio-tools grpcio-health-checking protobuf pydantic pydantic-core annotated-types typing-inspection typing-extensions"

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p "$WHEELS_DIR"
  grep -qxF "/$WHEELS_DIR/" .git/info/exclude 2>/dev/null || echo "/$WHEELS_DIR/" >> .git/info/exclude
  specs=()
  for pkg in $WHEEL_PACKAGES; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$pkg" 2>/dev/null || true)
    specs+=("$pkg${version:+==$version}")
  done
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$WHEELS_DIR" "${specs[@]}"
  ls -1 "$WHEELS_DIR"
  du -sh "$WHEELS_DIR"
  exit 0
fi

if compgen -G "$WHEELS_DIR/*.whl" >/dev/null; then
  site=/tmp/dspark-gpu-check-site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$WHEELS_DIR"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

device=cuda
for ((i = 1; i <= $#; i++)); do
  if [[ "${!i}" == "--device" ]]; then j=$((i + 1)); device=${!j}; fi
  if [[ "${!i}" == --device=* ]]; then device=${!i#--device=}; fi
done
if [[ -z "${DTYPES:-}" ]]; then
  if [[ "$device" == cpu ]]; then DTYPES=float32; else DTYPES="float32 bfloat16"; fi
fi
out_dir=${OUT:-/tmp}
mkdir -p "$out_dir"

"$PY" - <<'EOF'
import platform, torch, transformers, grpc
print(f"python {platform.python_version()}  torch {torch.__version__}  transformers {transformers.__version__}  "
      f"grpcio {grpc.__version__}  cuda available {torch.cuda.is_available()}"
      + (f"  ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""), flush=True)
EOF
"$PY" -c "from dspark_common import protogen; protogen.ensure()"  # generates only when missing or stale

status=0
for dtype in $DTYPES; do
  echo "== gpu_check: device $device, dtype $dtype"
  if "$PY" -m bench.gpu_check --device "$device" "$@" --dtype "$dtype" --out "$out_dir/gpu_check-$dtype.json" \
      > "$out_dir/gpu_check-$dtype.log" 2>&1; then
    echo "   lossless"
  else
    rc=$?
    status=1
    echo "   FAILED (exit $rc): see $out_dir/gpu_check-$dtype.log"
    tail -n 30 "$out_dir/gpu_check-$dtype.log"
  fi
  "$PY" - "$out_dir/gpu_check-$dtype.json" <<'EOF' || true
import json, sys
r = json.load(open(sys.argv[1]))
if "error" in r:
    print("   error:", r["error"]); sys.exit()
for world, w in r["worlds"].items():
    for mode, m in w["modes"].items():
        s, c = m["sequential"], m["concurrent"]
        print(f"   {world:6} draft {mode:>4}: {s['tokens_per_s']:8.1f} tok/s alone, {c['tokens_per_s']:8.1f} tok/s "
              f"{c['sessions']} at once, accepted {s['accepted']}/{s['proposed']}, tokens/round {s['mean_accepted_length']}")
    for mm in w["mismatches"]:
        print("   MISMATCH", mm)
EOF
done
exit $status
