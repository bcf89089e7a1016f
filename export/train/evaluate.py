"""Note-level transcription metrics for training, and the dev-set reader.

The metrics live in the torch-free runtime (runtime/metrics.py: mir_eval, onset tolerance 50 ms,
offset ratio 0.2, velocity via mir_eval.transcription_velocity) so that `pianolm eval` scores
without torch; they are re-exported here for the training code.

    evaluate(pred, ref) -> {"onset_f": ..., "onset_offset_f": ..., "onset_offset_velocity_f": ...}
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pianolm.runtime.evaluation import find_clips, read_reference
from pianolm.runtime.metrics import (
    METRICS,
    OFFSET_MIN_TOLERANCE,
    OFFSET_RATIO,
    ONSET_TOLERANCE,
    evaluate,
    mean_scores,
    reference_notes,
    score_notes,
)
from pianolm.runtime.notes import Note

__all__ = ["DEFAULT_DEVSET", "METRICS", "OFFSET_MIN_TOLERANCE", "OFFSET_RATIO",
           "ONSET_TOLERANCE", "devset_path", "evaluate", "load_devset", "mean_scores",
           "reference_notes", "score_notes"]

DEFAULT_DEVSET = "../shared/devset"  # beside the checkout (README "Evaluate"); $PIANOLM_DEVSET wins


def devset_path(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get("PIANOLM_DEVSET") or DEFAULT_DEVSET)


def load_devset(path: str | os.PathLike | None = None
                ) -> list[tuple[str, np.ndarray, list[Note]]]:
    """The dev set's clips as (name, 16 kHz mono float32 audio, reference notes), by name.

    Clips as `pianolm eval --data` finds them (runtime/evaluation.py `find_clips`): every audio
    file with a reference of the same stem (.tsv, already pedal-extended, else .mid read with
    the pedal). Measure on it; never train on it.
    """
    from pianolm.runtime.audio import load_audio

    root = devset_path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no dev set folder (set $PIANOLM_DEVSET)")
    return [(c.name, load_audio(c.audio), read_reference(c.reference))
            for c in find_clips(root)]
