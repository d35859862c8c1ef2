#!/usr/bin/env bash
# The one GPU check: the GPU-relevant checks and benchmarks on one CUDA device, one summary at the end.
# Budget: about 8 minutes on an H200 (each step is bounded by its own timeout).
#
#   bash benchmarks/gpu_check.sh            # on a CUDA machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run  # on CPU: the same steps, small and untimed (Triton interpreted)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
if [[ $DRY == 0 ]] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: CUDA is not available here; use --dry-run to exercise the script on CPU" >&2
    exit 2
fi
LOG=${GPU_CHECK_LOG:-gpu_check.log}
: > "$LOG"
SUMMARY=()
step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2; shift 2
    echo "=== $name: $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    SUMMARY+=("$(printf '%-22s rc=%-3s %4ss' "$name" "$rc" $((SECONDS - start)))")
}
if [[ $DRY == 1 ]]; then
    export TRITON_INTERPRET=1
    step checks 300 $PY benchmarks/gpu_check.py --dry-run
    step optimizer_update 120 $PY benchmarks/optimizer_update.py --device cpu --numel 65536 --repeats 3
    step zero_step 300 $PY benchmarks/zero_step.py --model mlp --world-size 1 --steps 4 --warmup 1 --no-compile
    step offload 200 $PY benchmarks/offload.py --device cpu --steps 4 --warmup 1 --layers 2 --embd 64
    step inference 200 $PY benchmarks/inference.py --n-layer 2 --n-embd 64 --new 8 --repeats 1
    step train_step 300 $PY benchmarks/train_step.py --model tiny --steps 10 --warmup 2 --no-compile-time
    step checkpoint 120 $PY benchmarks/checkpoint.py --gib 0.05 --repeats 2 --skip-dcp --skip-reshard
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
    step checks 180 $PY benchmarks/gpu_check.py
    step triton_tests 120 $PY -m pytest -q tests/test_triton_kernels.py tests/test_optim_base.py
    step optimizer_update 90 $PY benchmarks/optimizer_update.py --device cuda
    step zero_step 150 $PY benchmarks/zero_step.py --device cuda --world-size 1
    step offload 60 $PY benchmarks/offload.py --device cuda --steps 10
    step inference 240 $PY benchmarks/inference.py  # 5 GPT + 1 HF compiles
    step train_step 150 $PY benchmarks/train_step.py --device cuda --steps 20 --warmup 3
    step checkpoint 60 $PY benchmarks/checkpoint.py --device cuda --gib 1 --repeats 3
fi
echo "=== summary (log: $LOG)"
printf '%s\n' "${SUMMARY[@]}"
grep -h "^CHECK" "$LOG"
