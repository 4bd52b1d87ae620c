#!/usr/bin/env bash
# One device-tool call that checks the engine on a CUDA machine and times it; everything lands in $OUT.
#   bash bench/gpu_session.sh [quick|full|checks|families|generate|generate-checks|generate-ve|calibration]
# checks: the coverage matrix's families on CUDA (bench/coverage_cuda.py), the triton/torch check (softcap included),
# every command on CUDA (bench/commands.py), the interventions' checks and timing (bench/interventions.py);
# generate, generate-checks, generate-ve: generation with the tracker (bench/generate.py: CUDA checks, the 7B and
# 135M timings);
# calibration: ablate and release on the toy: models with a known answer, held to tests/test_toy_lm.py's thresholds
# (bench/calibration.py), in the commands' default dtype (bfloat16 on a GPU) and in float32;
# families: learned sinks' cost on the 7B shape and the Gemma-2-9B softcap table at 4x1024 and 1x4096;
# quick: the checks, then the planted-sinks table at 4x1024 and 1x4096 with the end-to-end scan row; full: the same
# with both tables (planted, none) at every size. SPEED_MODEL: the model bench/interventions.py times.
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
if [ "$MODE" = generate ] || [ "$MODE" = generate-checks ]; then  # generation with the tracker: checks on CUDA,
  # then (generate) the 7B target as the command runs
  python3 bench/generate.py --archs llama,llama:static,gemma3,gemma3:static,gemma3:sliding_window,llama:offloaded,gemma3:offloaded_static,gpt_oss,gemma2,qwen2,qwen3_next,mistral,gpt2 \
    --device cuda --json "$OUT/generate_archs.json" 2>&1 | grep -v Warning | tee "$OUT/generate_archs.log" || status=1
  python3 bench/commands.py --device cuda --only generate,view-generation --json "$OUT/generate_commands.json" 2>&1 \
    | tee "$OUT/generate_commands.log" || status=1
  [ "$MODE" = generate-checks ] && exit $status
  python3 bench/generate.py --model random:qwen2.5-7b --device cuda --dtype bfloat16 --batches 1,32 --prefill 1024 \
    --new 512 --repeats 1 --check --json "$OUT/generate_7b.json" 2>&1 | grep -v Warning | tee "$OUT/generate_7b.log" || status=1
  exit $status
elif [ "$MODE" = generate-ve ]; then  # the tracker's own VE kept (--tracker-ve) at 7B batch 32; the 135M shape
  python3 bench/generate.py --model random:qwen2.5-7b --device cuda --dtype bfloat16 --batches 32 --prefill 1024 \
    --new 512 --repeats 1 --tracker-ve --json "$OUT/generate_7b_ve.json" 2>&1 | grep -v Warning \
    | tee "$OUT/generate_7b_ve.log" || status=1
  python3 bench/generate.py --model random:smollm2-135m --device cuda --dtype float32 --batches 1,8 --prefill 32 \
    --new 256 --repeats 2 --json "$OUT/generate_135m.json" 2>&1 | grep -v Warning | tee "$OUT/generate_135m.log" || status=1
  exit $status
fi
if [ "$MODE" = calibration ]; then
  python3 bench/calibration.py --json "$OUT/calibration_auto.json" 2>&1 | tee "$OUT/calibration_auto.log" || status=1
  python3 bench/calibration.py --dtype float32 --json "$OUT/calibration_float32.json" 2>&1 \
    | tee "$OUT/calibration_float32.log" || status=1
  exit $status
fi
if [ "$MODE" = families ]; then
  python3 bench/attention.py --sinks planted --sizes 4x1024,1x4096 --modes sdpa,catchtag,catchtag-sinks \
    --json "$OUT/learned_sinks.json" 2>&1 | grep -v '^{' | tee "$OUT/learned_sinks.log" || status=1
  python3 bench/attention.py --shape gemma2-9b --sinks planted --sizes 4x1024,1x4096 \
    --modes fused-no-softcap,eager,catchtag --json "$OUT/gemma2.json" 2>&1 | grep -v '^{' | tee "$OUT/gemma2.log" || status=1
  exit $status
fi
python3 bench/coverage_cuda.py --json "$OUT/coverage_cuda.json" 2>&1 | tee "$OUT/coverage_cuda.log" || status=1
python3 bench/attention.py --check --sizes "" 2>&1 | tee "$OUT/check.log" || status=1
python3 bench/commands.py --device cuda --out /tmp/cmds --json "$OUT/commands.json" 2>&1 | tee "$OUT/commands.log" || status=1
python3 bench/interventions.py --device cuda --speed "${SPEED_MODEL:-random:smollm2-135m}" \
  --json "$OUT/interventions.json" 2>&1 | tee "$OUT/interventions.log" || status=1
if [ "$MODE" = checks ]; then
  exit $status
elif [ "$MODE" = quick ]; then
  python3 bench/attention.py --sinks planted --sizes 4x1024,1x4096 --scan 64 --json "$OUT/bench.json" 2>&1 \
    | grep -v '^{' | tee "$OUT/bench.log" || status=1
else
  python3 bench/attention.py --sinks planted,none --scan 64 --json "$OUT/bench.json" 2>&1 \
    | grep -v '^{' | tee "$OUT/bench.log" || status=1
fi
exit $status
