#!/usr/bin/env bash
# One device-tool call that checks the engine on a CUDA machine and times it; everything lands in $OUT.
#   bash bench/gpu_session.sh [quick|full]
# quick: the triton/torch check, every command on CUDA (bench/commands.py), the interventions' checks and timing
# (bench/interventions.py), the planted-sinks table at 4x1024 and 1x4096 with the end-to-end scan row; full: the
# same with both tables (planted, none) at every size. SPEED_MODEL: the model bench/interventions.py times.
set -uo pipefail
MODE=${1:-full}
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then  # packages the device image lacks (builtin:truth's countryinfo, ...)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
status=0
python3 bench/attention.py --check --sizes "" 2>&1 | tee "$OUT/check.log" || status=1
python3 bench/commands.py --device cuda --out /tmp/cmds --json "$OUT/commands.json" 2>&1 | tee "$OUT/commands.log" || status=1
python3 bench/interventions.py --device cuda --speed "${SPEED_MODEL:-random:smollm2-135m}" \
  --json "$OUT/interventions.json" 2>&1 | tee "$OUT/interventions.log" || status=1
if [ "$MODE" = quick ]; then
  python3 bench/attention.py --sinks planted --sizes 4x1024,1x4096 --scan 64 --json "$OUT/bench.json" 2>&1 \
    | grep -v '^{' | tee "$OUT/bench.log" || status=1
else
  python3 bench/attention.py --sinks planted,none --scan 64 --json "$OUT/bench.json" 2>&1 \
    | grep -v '^{' | tee "$OUT/bench.log" || status=1
fi
exit $status
