"""Does the velocity curve that `pianolm train tune-rolls` fits generalise to pieces it was not
fitted on? Leave-one-out over validation pieces: fit on the others, score the one left out.

    python benchmarks/probes/velocity_curve_cv.py --encoder-dir work/runs/hppnet-vl \
        --data work/data/synth2 --items 12

Uses the roll thresholds stored in the encoder's encoder.json (its curve is refitted per fold).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import torch

from pianolm.export.train.encoder import load_encoder, roll_config, validation_pieces
from pianolm.export.train.evaluate import score_notes
from pianolm.export.train.thresholds import fit_velocity_curve
from pianolm.runtime.rolls import decode_rolls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder-dir", required=True)
    ap.add_argument("--data", required=True, help="rendered dataset (its validation split)")
    ap.add_argument("--items", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    encoder, meta = load_encoder(args.encoder_dir)
    fps = float(meta["frames_per_second"])
    cfg = replace(roll_config(meta), velocity_curve=())
    pieces = validation_pieces(encoder, args.data, args.items)
    rows = []
    for k, piece in enumerate(pieces):
        curve = fit_velocity_curve(pieces[:k] + pieces[k + 1:], fps, cfg)
        plain = score_notes(decode_rolls(piece.rolls, fps, cfg), piece.reference)
        curved = score_notes(decode_rolls(piece.rolls, fps, replace(cfg, velocity_curve=curve)),
                             piece.reference)
        rows.append((plain["onset_offset_velocity_f"], curved["onset_offset_velocity_f"]))
    plain_f, curved_f = np.mean(rows, axis=0)
    print(json.dumps({"pieces": len(rows), "vel_f_without_curve": round(float(plain_f), 4),
                      "vel_f_with_curve_left_out": round(float(curved_f), 4)}))


if __name__ == "__main__":
    main()
