#!/usr/bin/env bash
# First light on a CUDA machine, in one command of about 9 minutes: step time and memory of
# cifar10 and celebahq256 under every precision and memory option with K = 1000 evaluation (gpu_check.py), the
# activation-memory estimate against torch.cuda.max_memory_allocated at two batch sizes (activation_memory.py), one
# DDP run over NCCL at world size 1, and last the torch.compile row (inductor's max-autotune compile takes minutes).
# Each part has its own time limit and its status goes to $OUT/summary.txt; one failing part does not stop the rest.
#
#     OUT=first_light bash benchmarks/first_light.sh      # from the repository root; torch is the machine's own build
set -uo pipefail
OUT=${OUT:-first_light}
mkdir -p "$OUT"
part() {   # part NAME SECONDS COMMAND...: run with a limit, output to $OUT/NAME.{md,err}, status to the summary
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.md" 2> "$OUT/$name.err"
  echo "$name: status $? in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}
pip install -q --no-deps -e . > "$OUT/install.err" 2>&1 || { echo "install failed" | tee -a "$OUT/summary.txt"; exit 1; }
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" \
  | tee "$OUT/device.txt"
part gpu_check 210 python benchmarks/gpu_check.py --presets cifar10,celebahq256 --no-compile --steps 3 \
  --budget-minutes 3.2
part activation_memory_cuda 130 python benchmarks/activation_memory.py --device cuda --presets celebahq256 \
  --options plain,checkpointing --precisions fp16 --cuda-batches 1,2 --json "$OUT/activation_memory_cuda.json"
part ddp_nccl 80 torchrun --standalone --nproc_per_node 1 -m nvae train --device cuda --max-steps 3 \
  --run-dir "$OUT/ddp_run" --no-progress
part gpu_check_compile 140 python benchmarks/gpu_check.py --presets cifar10 --options "bf16 compile" --steps 3 \
  --eval-k 10 --budget-minutes 2.2
