"""Roll-decoding threshold tuning for a trained encoder (`pianolm train tune-rolls`).

    tune_rolls("runs/hppnet", "work/data/synth1")
    pianolm train tune-rolls --encoder-dir runs/hppnet --data work/data/synth1

`tune_roll_thresholds` searches runtime/rolls.py's RollDecodeConfig on whole validation pieces
(encoder.py's `validation_pieces`: rolls as at inference, reference notes): onset threshold,
then frame and offset thresholds, then a velocity curve (`fit_velocity_curve`) where it helps.
`tune_rolls` runs that for an encoder run folder and stores the result in its encoder.json
("rolls", read back by encoder.py's `roll_config` and carried into assembled checkpoints),
with validation and dev-set scores.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pianolm.runtime.metrics import matched_pairs
from pianolm.runtime.rolls import RollDecodeConfig, decode_rolls

from .common import atomic_write_text, set_threads
from .encoder import (
    BEST_FILE,
    ENCODER_FILE,
    ENCODER_JSON,
    ScoredPiece,
    devset_pieces,
    load_encoder,
    score_by_piano,
    validation_pieces,
)
from .evaluate import mean_scores, score_notes
from .targets import TargetConfig


def tune_roll_thresholds(pieces: Sequence[ScoredPiece], fps: float,
                         base: RollDecodeConfig | None = None,
                         onset_grid: Iterable[float] = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45,
                                                        0.5, 0.6),
                         frame_grid: Iterable[float] = (0.1, 0.2, 0.3, 0.4, 0.5),
                         offset_grid: Iterable[float] = (0.2, 0.3, 0.4, 0.5, 1.01),
                         ) -> tuple[RollDecodeConfig, dict[str, float]]:
    """Coordinate search on validation pieces: the onset threshold for onset F1, then frame and
    offset thresholds together for onset+offset F1 (offset 1.01 = ignore offset peaks), then a
    velocity curve (`fit_velocity_curve`) if it raises onset+offset+velocity F1.
    Returns the best config and its mean scores."""
    cfg = base or RollDecodeConfig()

    def score(c: RollDecodeConfig) -> dict[str, float]:
        return mean_scores(score_notes(decode_rolls(p.rolls, fps, c), p.reference)
                           for p in pieces)

    best = max((replace(cfg, onset_threshold=t) for t in onset_grid),
               key=lambda c: score(c)["onset_f"])
    best = max((replace(best, frame_threshold=f, offset_threshold=o)
                for f in frame_grid for o in offset_grid),
               key=lambda c: score(c)["onset_offset_f"])
    scores = score(best)
    curved = replace(best, velocity_curve=fit_velocity_curve(pieces, fps, best))
    if curved.velocity_curve:  # kept only where it helps on these pieces
        curved_scores = score(curved)
        if curved_scores["onset_offset_velocity_f"] > scores["onset_offset_velocity_f"]:
            return curved, curved_scores
    return best, scores


def fit_velocity_curve(pieces: Sequence[ScoredPiece], fps: float, cfg: RollDecodeConfig,
                       degree: int = 2) -> tuple[float, ...]:
    """A least-squares polynomial from the velocity roll (x 127) to the reference velocity,
    over the notes `cfg` decodes that match a reference onset (50 ms, same pitch). mir_eval
    fits a line per piece anyway, so what a curve adds is its bend: the roll regresses toward
    the mean. () where it would not rise over 1..127, or with too few notes to fit."""
    plain = replace(cfg, velocity_curve=())
    pairs = [(p_.velocity, r.velocity) for p in pieces
             for p_, r in matched_pairs(decode_rolls(p.rolls, fps, plain), p.reference)]
    if len(pairs) < 10 * (degree + 1):
        return ()
    x, y = np.array(pairs, np.float64).T
    coef = np.polyfit(x, y, degree)
    if np.any(np.diff(np.polyval(coef, np.arange(1, 128))) <= 0):
        return ()
    return tuple(float(c) for c in coef)


def tune_rolls(encoder_dir: str | os.PathLike, data_root: str | os.PathLike,
               n_items: int = 32, best: bool = True, devset: str | None = "",
               encoder: nn.Module | None = None, quiet: bool = False) -> dict[str, Any]:
    """Tune roll-decoding thresholds on validation pieces, store them in encoder.json
    ("rolls"), and report validation (and dev-set) scores with them."""
    model, meta = load_encoder(encoder_dir, best=best, encoder=encoder)
    fps = float(meta["frames_per_second"])
    pieces = validation_pieces(model, data_root, n_items)
    if not pieces:
        raise ValueError(f"{data_root}: no validation pieces to tune on")
    cfg, val = tune_roll_thresholds(pieces, fps)
    targets = TargetConfig(**meta.get("targets", {"frames_per_second": fps}))
    by_piano = score_by_piano(pieces, fps, targets, cfg)
    if "pianos" in by_piano:
        val["pianos"] = by_piano["pianos"]
    meta["rolls"] = cfg.to_dict()
    meta["rolls_tuned_on"] = {"data_root": str(data_root), "items": len(pieces),
                              "weights": BEST_FILE if best else ENCODER_FILE}
    result: dict[str, Any] = {"rolls": cfg.to_dict(), "validation": val}
    dev = devset_pieces(model, devset)
    if dev:
        per_clip = {p.name: score_notes(decode_rolls(p.rolls, fps, cfg), p.reference)
                    for p in dev}
        result["devset"] = mean_scores(per_clip.values())
        result["devset_clips"] = per_clip
    meta["rolls_scores"] = {k: v for k, v in result.items() if k != "devset_clips"}
    atomic_write_text(Path(encoder_dir) / ENCODER_JSON, json.dumps(meta, indent=1) + "\n")
    if not quiet:
        print(json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------------------------------------
# CLI


def add_cli(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("tune-rolls", help="tune roll-decoding thresholds on validation pieces")
    t.add_argument("--encoder-dir", required=True, help="encoder run folder")
    t.add_argument("--data", required=True,
                   help="rendered dataset root(s), comma-separated: renders of held-out pianos "
                        "choose thresholds for pianos never heard in training")
    t.add_argument("--items", type=int, default=32, help="validation pieces to tune on, per root")
    t.add_argument("--last", action="store_true", help="tune encoder.safetensors, not best")
    t.add_argument("--devset", default="")
    t.add_argument("--threads", type=int, default=None)
    t.set_defaults(func=_run_tune)


def _run_tune(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    tune_rolls(args.encoder_dir, args.data, args.items, best=not args.last, devset=args.devset)
    return 0
