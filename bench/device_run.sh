#!/usr/bin/env bash
# The GPU bench as one command on the device machine (the `run` tool, carry [".whl"]), from the repo root:
#     bash bench/device_run.sh
# 1. installs the carried wheels (what the GPU image lacks, plus our pinned timm and lightning) into /tmp/site;
# 2. prints the GPU and the versions;
# 3. runs the step, openclip, profile, data and variants sections, in that order, into $OUT: the report
#    (.json, .md) and bench.log. Variants run last: they are evidence for proposed changes, not the headline.
# The bench rewrites its report after every measured row and `timeout` bounds the run, so a slow or failing section leaves the others' results.
# BENCH_BUDGET_S (default 450) is the bench's own limit; extra arguments go to run_bench.py.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
BUDGET=${BENCH_BUDGET_S:-450}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "[device_run] wheel install failed (is .whl carried?)"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw,temperature.gpu \
  --format=csv || true
python3 - <<'PY'
import importlib, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version(), "|", torch.cuda.get_device_name(0))
for name in ("lightning", "timm", "open_clip", "webdataset", "omegaconf", "triton", "pe_lightning"):
    try:
        m = importlib.import_module(name)
        print(f"  {name} {getattr(m, '__version__', '?')} from {m.__file__}")
    except Exception as e:
        print(f"  {name} MISSING: {type(e).__name__}: {e}")
PY

timeout --signal=TERM --kill-after=20 "$BUDGET" \
  python3 bench/run_bench.py --device cuda --sections step,openclip,data,variants,profile --data-seconds 4 --out "$OUT" "$@" \
  2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "[device_run] the bench hit its ${BUDGET}s budget; the report in \$OUT has what was measured"
nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu,memory.used --format=csv || true
ls -la "$OUT"
exit "$rc"
