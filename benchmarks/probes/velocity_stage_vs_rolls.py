"""Does the LM velocity stage read velocity better than the encoder's velocity roll? Both are
given the true notes of the same validation segments and scored the same way (per segment, as
`pianolm train lm` validates the stage: mir_eval onset+offset+velocity F1, true onsets and
offsets, so only velocity can miss).

    python benchmarks/probes/velocity_stage_vs_rolls.py --lm-dir work/runs2/lm-velocity \
        --embeddings work/emb/vl-val --encoder-dir work/runs/hppnet-vl

The roll is read at each note's onset frame of the stored embeddings (HPPNet's layout: onset,
offset, frame, velocity rolls of 88 keys), raw and through the encoder's velocity curve.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from pianolm.export.train.embeddings import load_embeddings_index, load_items
from pianolm.export.train.encoder import read_encoder_meta, roll_config
from pianolm.export.train.evaluate import evaluate, mean_scores
from pianolm.export.train.examples import EmbeddingStore, build_examples
from pianolm.export.train.lm import _segment_notes_local, decode_scores, load_decoder
from pianolm.runtime.notes import Note
from pianolm.runtime.rolls import ROLL_KEYS, RollDecodeConfig
from pianolm.runtime.vocab import MIN_PITCH, NUM_PITCHES

METRIC = "onset_offset_velocity_f"


def roll_scores(examples, store, cfg: RollDecodeConfig, fps: float) -> float:
    col = ROLL_KEYS.index("velocity") * NUM_PITCHES - MIN_PITCH
    scores = []
    for e in examples:
        emb = store.get(e.item, e.shift, e.row)
        ref = _segment_notes_local(e.segment, carried=False)
        pred = [Note(n.onset, n.offset, n.pitch,
                     cfg.velocity(float(emb[min(round(n.onset * fps), len(emb) - 1),
                                            col + n.pitch])))
                for n in ref]
        scores.append(evaluate(pred, ref))
    return mean_scores(scores)[METRIC]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lm-dir", required=True, help="velocity-stage run folder")
    ap.add_argument("--embeddings", required=True, help="the encoder's embeddings folder")
    ap.add_argument("--encoder-dir", required=True, help="encoder run (its velocity curve)")
    ap.add_argument("--last", action="store_true", help="the run's latest weights, not best")
    args = ap.parse_args()
    torch.set_num_threads(1)
    index = load_embeddings_index(args.embeddings)
    if index["embed_dim"] != len(ROLL_KEYS) * NUM_PITCHES:
        raise SystemExit(f"{args.embeddings}: {index['embed_dim']}-d embeddings are not rolls "
                         f"(HPPNet's {len(ROLL_KEYS) * NUM_PITCHES}-d layout)")
    items = load_items(args.embeddings, "validation", index)
    examples, _ = build_examples(items, "velocity", (0.0,), 2048)
    store = EmbeddingStore(items)
    cfg = roll_config(read_encoder_meta(args.encoder_dir))
    fps = float(index["frames_per_second"])
    decoder, dmeta = load_decoder(args.lm_dir, best=not args.last)
    if not args.last:  # decoder.json describes the latest weights
        dmeta = {**dmeta, "step": "best"}
    lm = decode_scores("velocity", decoder, examples, store)[METRIC]
    print(f"{len(examples)} validation segments, true notes given; +velocity F1 per segment:")
    raw = roll_scores(examples, store, replace(cfg, velocity_curve=()), fps)
    print(f"  velocity roll, raw               {raw:.3f}")
    print(f"  velocity roll, velocity curve    {roll_scores(examples, store, cfg, fps):.3f}")
    print(f"  LM velocity stage, step {dmeta['step']:<6}   {lm:.3f}")


if __name__ == "__main__":
    main()
