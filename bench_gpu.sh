#!/usr/bin/env bash
# The GPU check (README, Speed), about 10 minutes on an H100 / H200; every figure goes to one summary file.
#
#   bash bench_gpu.sh                 # on a GPU machine: out/bench_gpu/summary.md
#   IJEPA_DIR=/path/to/ijepa bash bench_gpu.sh    # also Meta's I-JEPA code beside ours (img/s, MFU)
#   bash bench_gpu.sh --dry-run       # no GPU: the same steps at tiny sizes on the CPU, Triton in its interpreter
#
# 1. tests/test_attention.py on the GPU: Triton forward and backward against float64, fp32 / fp16 / bf16, head dims
#    32-128, plus sequences 256 and 1369 at head dims 64 / 80 / 128 in bf16 and fp16
# 2. triton_attn/bench_attention.py: TFLOP/s of Triton and every SDPA backend, forward, backward, both
# 3. bench.py: ViT-B/14 at 224 px, batch 128, bf16, --attn triton and sdpa (and Meta's code with IJEPA_DIR):
#    img/s, MFU against a matmul peak measured in the same run, peak memory
# 4. 200 steps of pretrain.py on sample_data with --attn triton, --attn sdpa and (the bf16 noise yardstick)
#    --attn sdpa --dtype fp32: triton's loss curve must be as close to sdpa's as bf16 is to fp32
# OUT_DIR (default out/bench_gpu) and PYTHON (default python) may be set.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
OUT=${OUT_DIR:-out/bench_gpu}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
mkdir -p "$OUT"
SUMMARY=$OUT/summary.md
: > "$SUMMARY"

if [ $DRY = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    TESTS=(-k "match_float64 and (float32-1x2x1x32 or bfloat16-1x1x1x64)")
    SHAPES=""
    BENCH=(--model vit_tiny --img_size 112 --batch_size 2 --pred_depth 1 --pred_dim 96 --dtype fp32 --steps 1
           --warmup 0 --device cpu --threads 1)
    PRE=(--batch_size 2 --pred_depth 1 --max_steps 2 --log_every 1)  # PRE[5]: the steps
else
    export TRITON_INTERPRET=0
    TESTS=()
    SHAPES="--shapes 128x12x256x64,32x12x1369x64,128x12x256x80,32x12x1369x80,128x12x256x128,32x12x1369x128"
    BENCH=(--model vit_base --img_size 224 --batch_size 128 --dtype bf16 --steps 10 --warmup 3 --repeats 3)
    PRE=(--log_every 10 --batch_size 16 --max_steps 200)
fi
[ -n "${IJEPA_DIR:-}" ] && BENCH+=(--ijepa_dir "$IJEPA_DIR")

FAILED=()
section() {  # section TITLE COMMAND...: the command's output (no progress bars) into the summary, under TITLE
    local title=$1 t0=$SECONDS; shift
    echo "== $title" | tee -a "$SUMMARY"
    "$@" 2>&1 | tr '\r' '\n' | sed '/it\/s[],]/d' | tee -a "$SUMMARY" || FAILED+=("$title")
    echo "($((SECONDS - t0)) s)" | tee -a "$SUMMARY"
}

{ echo "# bench_gpu.sh $(date -u +%FT%TZ)$([ $DRY = 1 ] && echo ' DRY RUN (CPU, tiny sizes)')"
  $PY -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() \
      if torch.cuda.is_available() else 'no GPU')"; } | tee -a "$SUMMARY"
section "Triton attention tests" $PY -m pytest -q tests/test_attention.py "${TESTS[@]}"
# shellcheck disable=SC2086
section "attention benchmark" $PY triton_attn/bench_attention.py $SHAPES
section "pretraining step" $PY bench.py --attn triton sdpa "${BENCH[@]}"
for run in triton:bf16 sdpa:bf16 sdpa:fp32; do
    attn=${run%:*} dtype=${run#*:}
    section "pretrain.py on sample_data, ${PRE[5]} steps, --attn $attn --dtype $dtype" $PY pretrain.py "${PRE[@]}" \
        --attn "$attn" --dtype "$dtype" --out_dir "$OUT/pretrain_${attn}_$dtype" --overwrite --seed 0 \
        --num_workers 2 --monitor_every 0
done
section "loss curves" $PY - "$OUT" <<'EOF'
import json, sys
def curve(name):
    rows = [json.loads(l) for l in open(f"{sys.argv[1]}/pretrain_{name}/log.jsonl")]
    return {r["step"]: r for r in rows if "loss" in r}
tri, sdpa, fp32 = (curve(n) for n in ("triton_bf16", "sdpa_bf16", "sdpa_fp32"))
steps = sorted(set(tri) & set(sdpa) & set(fp32))
d_attn = [abs(tri[s]["loss"] - sdpa[s]["loss"]) for s in steps]
d_prec = [abs(sdpa[s]["loss"] - fp32[s]["loss"]) for s in steps]
print(f"loss at step {steps[-1]}: triton {tri[steps[-1]]['loss']:.4f}, sdpa {sdpa[steps[-1]]['loss']:.4f}, "
      f"sdpa fp32 {fp32[steps[-1]]['loss']:.4f}")
print(f"|triton - sdpa| mean {sum(d_attn) / len(steps):.2e} max {max(d_attn):.2e}; bf16 noise |sdpa bf16 - fp32| "
      f"mean {sum(d_prec) / len(steps):.2e} max {max(d_prec):.2e} over {len(steps)} logged steps")
ok = sum(d_attn) <= 2 * sum(d_prec) + 1e-6
print(f"loss curves: triton {'within' if ok else 'OUTSIDE'} bf16 noise of sdpa")
for n, c in (("triton", tri), ("sdpa", sdpa)):
    last = c[steps[-1]]
    print(f"{n}: {last['img_per_s']:.0f} img/s at the last log, peak memory {last['mem_mb']} MiB")
EOF
echo "summary: $SUMMARY; failed: ${#FAILED[@]} section(s)${FAILED:+ (${FAILED[*]})}" | tee -a "$SUMMARY"
[ ${#FAILED[@]} = 0 ]
