#!/usr/bin/env bash
# The GPU checks (issues 9, 16, 21, 26), as one device call (the device tool: `run` with this command,
# timeout_s=600). It needs nothing installed: the device image's python3 has torch, accelerate,
# pytest, safetensors, pyyaml and tensorboard. Everything it prints also lands in $OUT.
#
#   bash benchmarks/gpu_session.sh          # on the GPU machine (about 6 minutes)
#   OUT=/tmp/o bash benchmarks/gpu_session.sh --dry   # here, on CPU: checks the script runs
set -uo pipefail
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
bench_args=()
if [ "${1:-}" = "--dry" ]; then
  PY=${PY_DRY:-.venv/bin/python}
  bench_args=(--quick --allow-cpu)
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "no nvidia-smi"
  $PY -c "import sys, torch, accelerate; print(sys.version.split()[0], 'torch', torch.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.txt"
# The CUDA tests: fp16 GradScaler, bf16, the deferred NaN verdict, the fused default optimizer.
timeout 240 $PY -m pytest -m cuda -q -p no:cacheprovider -o addopts="" tests 2>&1 | tee "$OUT/cuda_tests.txt"
tests_rc=$?
# Tokens/s vs a hand-written Accelerate loop in bf16 (medium MLP, GPT 8x512), and the per-step sync's price;
# TFLOP/s and MFU per loop (the model FLOPs the engine counts, against the GPU's dense bf16 peak), also as one
# line per workload in $OUT/mfu.txt.
timeout 300 $PY benchmarks/gpu.py "${bench_args[@]}" --out "$OUT/gpu_results.md" 2>&1 | tee "$OUT/gpu_bench.txt"
bench_rc=$?
grep -E "^(### |\| Engine, defaults)" "$OUT/gpu_bench.txt" | tee "$OUT/mfu.txt"
# FSDP2 over nccl on this GPU, in bf16 (a world of one: NCCL refuses two ranks on one device): trains,
# writes a sharded checkpoint with torch.distributed.checkpoint, validates and predicts through the shards.
timeout 90 $PY tests/scripts/fsdp_run.py "$OUT/fsdp" --strategy fsdp --bf16 2>&1 | tail -20 | tee "$OUT/fsdp.txt"
fsdp_rc=${PIPESTATUS[0]}
$PY -c "import torch; r = torch.load('$OUT/fsdp/result.pt', weights_only=False); print('fsdp', r['strategy'], r['world_size'], 'step', r['step'], r['validate'])" 2>&1 | tee -a "$OUT/fsdp.txt"
# N-D layouts over nccl (issue 25): the 2-D (dp_shard 2 x tp 2) and HSDP 2 x 2 runs, their resumes and the
# FSDP 4 resume of tests/scripts/layouts_run.py need 4 GPUs; one GPU runs the meta-device build with activation
# checkpointing under FSDP (a world of one). Either way the initial weights and results land in $OUT/layouts.
ngpu=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$ngpu" -ge 4 ]; then
  timeout 300 $PY -m accelerate.commands.launch --config_file launch/ddp.yaml --num_processes 4 \
    tests/scripts/layouts_run.py four "$OUT/layouts" 2>&1 | tail -20 | tee "$OUT/layouts.txt"
else
  echo "2-D and HSDP over nccl: skipped (they need 4 GPUs; this machine has $ngpu)" | tee "$OUT/layouts.txt"
  mkdir -p "$OUT/layouts"
  timeout 120 $PY tests/scripts/layouts_run.py one "$OUT/layouts" 2>&1 | tail -10 | tee -a "$OUT/layouts.txt"
fi
cat "$OUT"/layouts/*.json 2>/dev/null | tee -a "$OUT/layouts.txt"
# For information (not in the exit status): the single-process suite with the GPU visible, so the
# engine runs on CUDA; tests that compare against a hand-written CPU loop may differ there.
# (The multiprocess tests launch launch/cpu_ddp.yaml, which is for machines without a GPU.)
timeout 120 $PY -m pytest -m "not multiprocess" -q -p no:cacheprovider -n 8 \
  tests/test_nan_policy.py tests/checkpoint/test_resume.py tests/observability/test_metrics.py tests/test_engine.py 2>&1 |
  tee "$OUT/suite_on_gpu.txt" | tail -15
echo "cuda tests exit $tests_rc, benchmark exit $bench_rc, fsdp exit $fsdp_rc" | tee -a "$OUT/machine.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$fsdp_rc" -eq 0 ]
