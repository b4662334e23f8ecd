#!/usr/bin/env bash
# Every GPU measurement of the compiled-fast-path work in one prepared run, sized for <= 8 minutes
# on one H200 (the device allowance is 15 minutes per session, start-up included). Each step has
# its own time limit, so one slow step cannot eat the others; results land in benchmarks/out/
# (or $OUT). Run from anywhere:  bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 1
python -c "import ponder_lightning" 2>/dev/null || pip install -q -e . || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
step() {  # step SECONDS NAME COMMAND...: run with a limit, keep its log, go on if it fails
  local limit=$1 name=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -25
}
# 1. Decoding == teacher-forced on the GPU, every model and gate variant (fp32), and row-wise with
#    the compiled in-place attention (a Triton kernel here) for the models whose rows drift apart.
step 100 decoding_equality env PYTHONPATH=tests python - <<'PY'
import torch
import test_decoding as t
from decode_helpers import decode_incrementally, decode_rowwise
torch.manual_seed(0)
worst = 0.0
for name, make in t.MODELS.items():
    model = make().cuda().eval()
    ids = torch.randint(0, t.VOCAB, (3, 24), device="cuda")
    with torch.no_grad():
        expected = model.backbone.logits(model.hidden_states(ids)[0])
    got, _, _ = decode_incrementally(model, ids, 9)
    rows, _, _ = decode_rowwise(model, ids, 9)
    gap = max((got - expected).abs().max().item(), (rows - expected[:, 9:]).abs().max().item())
    if name in ("adaponder_halting", "ponderlm_fixed_ratio"):
        compiled, _, _ = decode_rowwise(model, ids, 9, compile_attention=True)
        gap = max(gap, (compiled - expected[:, 9:]).abs().max().item())
    worst = max(worst, gap)
    print(f"{name}: max |decode - teacher forced| = {gap:.2e}")
assert worst <= 1e-4, worst
print("decoding equals teacher-forced on the GPU")
PY
# 2. Training throughput vs transformers, with MFU (vanilla 160m / 410m, bf16).
step 130 train_throughput python -m benchmarks.train_throughput --device cuda --bf16 --sizes pythia-160m pythia-410m \
  --batch 16 --seq_len 2048 --repeats 3 --peak_tflops 989
# 3. Compiled vs eager training steps (vanilla, PonderLM, AdaPonderLM at 160m, bf16).
step 130 compile_speed python -m benchmarks.compile_speed --device cuda --bf16 --shapes pythia-160m --batch 8 \
  --seq_len 2048 --repeats 3
# 4. Adaptive decoding: measured / ideal speedup and / pass bound (batch 8 also with the compiled
#    in-place attention), cached vs uncached PonderLM, tok/s.
step 120 adaptive_decode python -m benchmarks.adaptive_decode --device cuda --size pythia-160m --prompt_len 64 \
  --new_tokens 32 --repeats 3
cp benchmarks/out/*.json "$OUT"/ 2>/dev/null || true
echo "done: logs and JSON in $OUT"
