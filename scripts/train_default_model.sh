#!/usr/bin/env bash
# Rebuild the shipped default model (engines/default/) from nothing, on a CPU: render the
# training data, pre-train the encoder, embed, train the three LM stages, assemble, export,
# evaluate on the dev set. About 4 hours on a 2-core machine.
#
#   bash scripts/install_renderers.sh && bash scripts/train_default_model.sh
#
# This is the procedure the shipped model went through (engines/default/MODEL.md), with its
# step counts; it is not bit-exact (the shipped run was stopped and resumed by hand at the
# points the --until-step flags below mark, and threads interleave differently). The training
# logs of the shipped run are in benchmarks/results/default_model/.
# WORK (default work/) holds everything but the final export; OUT (default engines/default).
set -euo pipefail
cd "$(dirname "$0")/.."
work="${WORK:-work}"
data="$work/data/synth1"
runs="$work/runs"
emb="$work/emb"
out="${OUT:-engines/default}"
devset="${PIANOLM_DEVSET:-../shared/devset}"
step() { printf '\n== %s\n' "$*"; }

step "render 1000 x 30 s pieces (5 pianos, music21 corpus + generated, augmented; ~6 min)"
pianolm data render --out "$data" --pieces 1000 --seconds 30 --seed 1 --workers 2

step "encoder: HPPNet-sp at CPU width (hppnet-cpu), frame-level roll objectives (~65 min)"
enc="$runs/hppnet-cpu"
[[ -f "$enc/state.pt" ]] || pianolm train encoder --data "$data" --encoder hppnet-cpu \
  --out "$enc" --steps 1700 --batch 4 --crop-seconds 4 --lr 1e-3 --warmup-steps 100 \
  --val-every 250 --val-items 4 --save-every 50 --until-step 656
pianolm train encoder --out "$enc" --resume --steps 1400  # then the shipped run's shorter schedule
pianolm train tune-rolls --encoder-dir "$enc" --data "$data" --items 12 --last --threads 2

step "embeddings: the encoder's (100 train, 12 validation pieces) and oracle rolls (all)"
pianolm train embed --data "$data" --encoder-dir "$enc" --out "$emb/real-train" --limit 100 \
  --splits train
pianolm train embed --data "$data" --encoder-dir "$enc" --out "$emb/real-val" --limit 12 \
  --splits validation
pianolm train embed --data "$data" --oracle --out "$emb/oracle" --shifts 0 5
pianolm train mix --out "$emb/mixed" --train "$emb/oracle:1" "$emb/real-train:4" \
  --validation "$emb/real-val"
pianolm train mix --out "$emb/real" --train "$emb/real-train:1" --validation "$emb/real-val"

step "LM stages (mini): a short start on the encoder's embeddings, then the mix (~45 min)"
lm=(--preset mini --batch 8 --lr 1e-3 --val-segments 36 --decode-segments 6 --threads 1)
# onset: 170 steps on oracle rolls first (the shipped run's first attempt)
[[ -f "$runs/lm-onset-oracle/decoder.json" ]] || pianolm train lm --stage onset \
  --embeddings "$emb/oracle" --out "$runs/lm-onset-oracle" --steps 3000 --warmup-steps 100 \
  --val-every 500 --until-step 170 "${lm[@]}"
declare -A stop=([onset]=745 [velocity]=506 [offset]=489)  # memorising 300 segments: stopped
for stage in onset velocity offset; do
  init=(); [[ $stage == onset ]] && init=(--init "$runs/lm-onset-oracle")
  [[ -f "$runs/lm-$stage/decoder.json" ]] || pianolm train lm --stage "$stage" \
    --embeddings "$emb/real" --out "$runs/lm-$stage" --steps 1600 --warmup-steps 80 \
    --val-every 300 --until-step "${stop[$stage]}" "${init[@]}" "${lm[@]}" &
done
wait
for stage in onset velocity offset; do
  resume=(); [[ -f "$runs/lm2-$stage/state.pt" ]] && resume=(--resume)
  pianolm train lm --stage "$stage" --embeddings "$emb/mixed" --out "$runs/lm2-$stage" \
    --init "$runs/lm-$stage" --steps 1500 --warmup-steps 50 --val-every 300 "${lm[@]}" \
    "${resume[@]}" &
done
wait

step "encoder, continued on 1000 fresh pieces (seed 2; ~60 min)"
# The LM stages above stay as they were, trained on the first encoder's embeddings.
data2="$work/data/synth2"
enc2="$runs/hppnet-cpu2"
pianolm data render --out "$data2" --pieces 1000 --seconds 30 --seed 2 --workers 2
cont=(--data "$data2" --encoder hppnet-cpu --batch 4 --crop-seconds 4 --lr 5e-4 --val-items 4
      --save-every 50)
# the shipped run's first attempt (an 1800-step schedule), stopped at step 161
[[ -f "$runs/hppnet-cpu2a/encoder.json" ]] || pianolm train encoder --init "$enc" \
  --out "$runs/hppnet-cpu2a" --steps 1800 --warmup-steps 50 --val-every 300 --until-step 161 \
  "${cont[@]}"
# then a 1300-step schedule from those weights, stopped at step 1156 (lr near its floor)
if [[ -f "$enc2/state.pt" ]]; then
  pianolm train encoder --out "$enc2" --resume --until-step 1156
else
  pianolm train encoder --init "$runs/hppnet-cpu2a" --out "$enc2" --steps 1300 \
    --warmup-steps 10 --val-every 325 --until-step 1156 "${cont[@]}"
fi
pianolm train tune-rolls --encoder-dir "$enc2" --data "$data2" --items 12 --last --threads 2

step "encoder with the level-aware velocity head (hppnet-cpu-vl; ~60 min): the shipped encoder"
# Same data; files scaled to peak 0.7 (the runtime does the same), +-2 dB jitter per crop; the
# velocity head's new level inputs start at zero weight, so step 0 is the encoder above.
enc3="$runs/hppnet-vl"
if [[ -f "$enc3/state.pt" ]]; then
  pianolm train encoder --out "$enc3" --resume
else
  pianolm train encoder --data "$data2" --encoder hppnet-cpu-vl --init "$enc2" --out "$enc3" \
    --steps 1100 --batch 4 --crop-seconds 4 --lr 3e-4 --warmup-steps 10 --gain-db 2 \
    --val-every 275 --val-items 4 --save-every 50
fi
pianolm train tune-rolls --encoder-dir "$enc3" --data "$data2" --items 12 --last --threads 2

step "assemble, export, evaluate"
pianolm train assemble --encoder-dir "$enc3" --onset "$runs/lm2-onset" \
  --velocity "$runs/lm2-velocity" --offset "$runs/lm2-offset" --out "$runs/system"
pianolm export --checkpoint "$runs/system" --out "$out" --verify
pianolm eval --data "$devset" --model "$out" --json benchmarks/results/eval_default_devset.json
