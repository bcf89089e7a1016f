"""Is there velocity in the audio that the encoder's velocity roll does not read? A probe, not a
product: a gradient-boosted regressor (scikit-learn) learns MIDI velocity per note from simple
note features on train pieces, and replaces the roll's velocity of every decoded note of the
validation pieces; mir_eval onset+offset+velocity F1 is compared with the roll's own.

    python benchmarks/probes/velocity_features_probe.py --encoder-dir work/runs/hppnet-vl \
        --data work/data/synth2 --train-items 60 --val-items 50

Feature sets (each note read at its onset frame b):
  roll            the velocity roll x 127 (a learned calibration: what the curve can do)
  levels          pitch, notes struck within 30 ms, and the velocity head's own level inputs
                  (hppnet.key_levels: each key's loudest CQT bin, at the key, the octave below
                  and above, the 12th and the double octave) at frames b-3..b+5
  roll+levels     both, plus the onset roll
  +piece-relative the same with each feature's median over the piece's notes subtracted too
                  (mir_eval fits a line per piece, so a note's level relative to the piece's is
                  what counts)
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingRegressor

from pianolm.export.data.dataset import load_item
from pianolm.export.hppnet import HPPNET_SP_CPU_VL, key_levels
from pianolm.export.train.encoder import load_encoder, roll_config, transcribe_rolls
from pianolm.export.train.evaluate import score_notes
from pianolm.export.train.examples import dataset_entries, piece_notes
from pianolm.runtime.audio import normalise_peak, segment_audio
from pianolm.runtime.metrics import matched_pairs
from pianolm.runtime.notes import Note
from pianolm.runtime.rolls import decode_rolls, join_segments
from pianolm.runtime.vocab import MIN_PITCH

KEY_OFFSETS = HPPNET_SP_CPU_VL.velocity_level
FRAMES = range(-3, 6)
METRIC = "onset_offset_velocity_f"


@torch.no_grad()
def piece_inputs(encoder, audio: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Rolls [T, 88] and the level inputs [T, 88, len(KEY_OFFSETS)] at each key. The encoder's
    forward pass does not return its CQT, so the front-end runs once more here."""
    segments = segment_audio(normalise_peak(audio, encoder.input_peak))
    cqt = encoder.frontend(torch.from_numpy(segments)).unsqueeze(1)  # [S, 1, T, bins]
    level = key_levels(cqt, encoder.config.bins_per_key, KEY_OFFSETS)  # [S, offsets, T, 88]
    level = join_segments({"level": level.permute(0, 2, 3, 1).numpy()},
                          encoder.frames_per_second, n_samples=len(audio))["level"]
    return transcribe_rolls(encoder, audio), level


def note_features(notes: list[Note], rolls: dict[str, np.ndarray], level: np.ndarray,
                  fps: float) -> np.ndarray:
    n_frames = len(level)
    onsets = np.array([n.onset for n in notes])
    rows = []
    for n in notes:
        b, k = min(int(round(n.onset * fps)), n_frames - 1), n.pitch - MIN_PITCH
        row = [rolls["velocity"][b, k] * 127, rolls["onset"][b, k], n.pitch,
               np.sum(np.abs(onsets - n.onset) < 0.03)]
        frames = [min(max(b + dt, 0), n_frames - 1) for dt in FRAMES]
        row.extend(level[frames, k].T.ravel())  # each level input over the frames
        rows.append(row)
    return np.array(rows, np.float32).reshape(len(rows), -1)


def with_relative(x: np.ndarray) -> np.ndarray:
    """Appends each feature (bar pitch and chord size) minus its median over the piece."""
    cols = [0, 1] + list(range(4, x.shape[1]))
    rel = x[:, cols] - np.median(x[:, cols], axis=0) if len(x) else x[:, cols]
    return np.concatenate([x, rel], axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder-dir", required=True)
    ap.add_argument("--data", required=True, help="rendered dataset (train and validation splits)")
    ap.add_argument("--train-items", type=int, default=60)
    ap.add_argument("--val-items", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the scores here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    encoder, meta = load_encoder(args.encoder_dir)
    fps = float(meta["frames_per_second"])
    cfg = replace(roll_config(meta), velocity_curve=())  # the roll's own reading

    def pieces(split: str, n: int):
        for e in dataset_entries(args.data, split)[:n]:
            audio, _, _ = load_item(args.data, e)
            rolls, level = piece_inputs(encoder, audio)
            notes = decode_rolls(rolls, fps, cfg)
            x = with_relative(note_features(notes, rolls, level, fps))
            yield notes, x, piece_notes(args.data, e)

    # train on the decoded notes that match a reference note, with its velocity as the target
    xs, ys = [], []
    for notes, x, ref in pieces("train", args.train_items):
        index = {id(n): i for i, n in enumerate(notes)}
        pairs = matched_pairs(notes, ref)
        xs.append(x[[index[id(est)] for est, _ in pairs]])
        ys.append([r.velocity for _, r in pairs])
    x_train, y_train = np.concatenate(xs), np.concatenate(ys).astype(np.float32)
    val = list(pieces("validation", args.val_items))

    n_plain = 4 + len(KEY_OFFSETS) * len(FRAMES)
    feature_sets = {"roll": [0], "levels": list(range(2, n_plain)),
                    "roll+levels": list(range(n_plain)),
                    "+piece-relative": list(range(x_train.shape[1]))}
    scores = {"velocity roll": float(np.mean([score_notes(n, r)[METRIC] for n, _, r in val]))}
    for name, cols in feature_sets.items():
        model = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, random_state=0)
        model.fit(x_train[:, cols], y_train)
        f1 = []
        for notes, x, ref in val:
            v = np.clip(np.rint(model.predict(x[:, cols])), 1, 127) if len(notes) else []
            f1.append(score_notes([replace(n, velocity=int(u)) for n, u in zip(notes, v)],
                                  ref)[METRIC])
        scores[name] = float(np.mean(f1))
    result = {"encoder_dir": args.encoder_dir, "data": args.data,
              "train_pieces": args.train_items, "train_notes": len(y_train),
              "val_pieces": len(val),
              "onset_offset_velocity_f": {k: round(v, 4) for k, v in scores.items()}}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
