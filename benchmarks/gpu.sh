#!/usr/bin/env bash
# Every GPU figure the project owes, on one CUDA GPU, in under eight minutes; the output is the record (paste it,
# with the device name it prints, into the closing note).
#   bash benchmarks/gpu.sh            # from the repository root, on a machine with CUDA
# 1. stage 1: ViT-VQGAN SS at 256 px, bf16, both engines: images/s and MFU        (benchmarks/train_stage1.py --gpu)
# 2. stage 2: VIM-Base at 1024 tokens, bf16, ZeRO-2 engine vs plain: tokens/s, MFU  (benchmarks/train_stage2.py --gpu)
# 3. sampling: KV-cached vs recomputation, bf16, tokens/s at 64/256/1024 tokens  (benchmarks/sample_prior.py)
# Each step has its own time limit, so one slow step cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/vitvq/torch_extensions}"
if ! python3 -c "import vitvq.models.prior" 2>/dev/null; then  # a bare machine: install this checkout, offline
  python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "cannot install vitvq here"; exit 1; }
fi
python3 - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device: benchmarks/gpu.sh needs a GPU"
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
for mod in ("deepspeed", "lpips", "webdataset", "mlflow", "ray"):
    try:
        print(f"  {mod} {__import__(mod).__version__}")
    except Exception as e:  # noqa: BLE001
        print(f"  {mod}: MISSING ({e})")
PY
step() {  # step LABEL SECONDS COMMAND...
  local label=$1 limit=$2; shift 2
  echo; echo "== $label (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@"; local rc=$?
  echo "== $label: exit $rc after $((SECONDS - t0)) s"
}
step "stage 1 ViT-VQGAN SS 256 px bf16" 200 python3 benchmarks/train_stage1.py --gpu --iters 10
step "stage 2 VIM-Base 1024 tokens bf16" 150 python3 benchmarks/train_stage2.py --gpu --steps 15
step "sampling, small GPT, vocab 8192, bf16" 90 python3 benchmarks/sample_prior.py --device cuda --dtype bf16
echo; echo "gpu.sh done in $SECONDS s"
