#!/usr/bin/env bash
# The LM stages with the roll prior (docs/decoder.md, "The roll prior"), from the shipped
# stages' weights, on the shipped encoder's embeddings: render, embed, train the three stages
# one after another on one core, assemble, export, evaluate on the dev set. Resumable: every
# step skips what is done, and a stopped stage resumes from its last save.
#
#   bash recipes/default_model/train_prior.sh            # WORK (default work/), OUT below
#
# The stages start as the roll decoder (the prior decides its slots at init: the shipped
# weights' scores of those slots are zeroed) and learn the corrections:
# - the loss is cross-entropy over what the decode grammar allows (--constrained-loss), where
#   the prior alone ranks the tokens at the start;
# - the prior's logits are first tempered to the lowest loss (--fit-temperature: greedy
#   decoding is unchanged), then its scales learn with the LM at a low rate (5e-5);
# - the best weights are those with the best greedy-decode F1, the start included.
# Logs and the best weights (fp16) are copied to recipes/default_model/record/lm-*-prior/.
set -euo pipefail
cd "$(dirname "$0")/../.."
work="${WORK:-work}"
record="recipes/default_model/record"
data="$work/data/prior"
emb="$work/emb/prior"
runs="$work/runs"
out="${OUT:-$work/models/prior}"
devset="${PIANOLM_DEVSET:-../shared/devset}"
steps="${STEPS:-3000}"
step() { printf '\n== %s  %s\n' "$(date -u +%H:%M:%S)" "$*"; }

step "render 340 x 30 s pieces (training pianos, rooms and microphones; seed 4)"
[[ -f "$data/index.json" ]] || pianolm data render --out "$data" --pieces 340 --seconds 30 \
  --seed 4 --workers 1

step "embed with the shipped encoder (encoder-gen2): 300 train, 12 validation pieces"
for split in train validation; do
  limit=$([[ $split == train ]] && echo 300 || echo 12)
  [[ -f "$emb/$split/index.json" ]] || pianolm train embed --data "$data" \
    --encoder-dir "$record/encoder-gen2" --out "$emb/$split" --limit "$limit" \
    --splits "$split" --shifts 0 --threads 1
done
[[ -f "$emb/mix/index.json" ]] || pianolm train mix --out "$emb/mix" --train "$emb/train:1" \
  --validation "$emb/validation"

step "LM stages with the roll prior, from the shipped stages ($steps steps each)"
lm=(--embeddings "$emb/mix" --preset mini --batch 8 --warmup-steps 50 --val-every 250
    --val-segments 36 --decode-segments 12 --threads 1 --log-every 50 --save-every 250
    --cross-positions time --look-ahead --roll-prior --lr 5e-5 --prior-lr-scale 1
    --constrained-loss --fit-temperature --best-by decode)
for stage in onset velocity offset; do
  run="$runs/prior/$stage"
  head=(--time-head pointer)  # as shipped: the velocity stage predicts no time
  [[ $stage == velocity ]] && head=()
  if [[ -f "$run/state.pt" ]]; then pianolm train lm --out "$run" --resume
  else pianolm train lm --out "$run" --stage "$stage" --steps "$steps" \
    --init "$record/lm-$stage-time" "${lm[@]}" "${head[@]}"; fi
  mkdir -p "$record/lm-$stage-prior"
  cp "$run/log.jsonl" "$run/decoder.json" "$record/lm-$stage-prior/"
  python - "$run" "$record/lm-$stage-prior" <<'EOF'
import sys
from safetensors.torch import load_file, save_file
best = load_file(f"{sys.argv[1]}/best.safetensors")
save_file({k: v.half() if v.is_floating_point() else v for k, v in best.items()},
          f"{sys.argv[2]}/best.fp16.safetensors")
EOF
done

step "assemble, export, evaluate (LM and rolls, dev set)"
pianolm train assemble --encoder-dir "$record/encoder-gen2" --onset "$runs/prior/onset" \
  --velocity "$runs/prior/velocity" --offset "$runs/prior/offset" --out "$runs/prior/system"
pianolm export --checkpoint "$runs/prior/system" --out "$out" --verify
pianolm eval --data "$devset" --model "$out" --threads 1 \
  --json "$record/lm-prior-eval-devset.json"
heldout="${HELDOUT:-$work/heldout/iowa-steinway/eval}"  # benchmarks/make_heldout_set.py
if [[ -d "$heldout" ]]; then
  pianolm eval --data "$heldout" --model "$out" --threads 1 \
    --json "$record/lm-prior-eval-heldout.json"
fi
