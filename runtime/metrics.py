"""Note-level transcription metrics (docs/model.md, "Evaluation"), torch-free.

    evaluate(pred, ref) -> {"onset_f": ..., "onset_offset_f": ..., "onset_offset_velocity_f": ...}

mir_eval.transcription with onset tolerance 50 ms, offset tolerance max(50 ms, 0.2 x the
reference note's duration), pitch tolerance 50 cents (exact MIDI keys here), and
mir_eval.transcription_velocity (velocities rescaled to the reference by linear regression,
then matched within 0.1) for the velocity-aware score. Reference offsets must already be
pedal-extended: `reference_notes(notes, pedal)` does it for notes as played.

    score_pedals(pred, ref) -> {"pedal_onset_f": ..., "pedal_onset_offset_f": ..., ...}

Sustain-pedal intervals (down, up) are scored as notes of one constant dummy pitch: onset
within 50 ms, and onset+offset with the same offset rule as notes (max(50 ms, 0.2 x the
reference interval)). Kong et al. (bytedance/piano_transcription,
pytorch/calculate_score_for_paper.py) score pedals the same way (mir_eval.transcription,
np.ones pitches, offset_ratio 0.2, offset_min_tolerance 0.05) but with a 200 ms onset tolerance
(`onset_tolerance=KONG_PEDAL_ONSET_TOLERANCE` reproduces theirs), report only the
onset+offset F1, and skip clips without reference pedal.

mir_eval is an optional dependency (`pip install 'pianolm[eval]'`): it is imported when a score
is computed, and `require_mir_eval()` says in one line what to install.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from .notes import Note, Pedal
from .sustain import extend_by_pedal

ONSET_TOLERANCE = 0.05
OFFSET_RATIO = 0.2
OFFSET_MIN_TOLERANCE = 0.05
METRICS = ("onset", "onset_offset", "onset_offset_velocity")
PEDAL_METRICS = ("pedal_onset", "pedal_onset_offset")
KONG_PEDAL_ONSET_TOLERANCE = 0.2  # Kong et al.'s pedal onset tolerance (module doc)
INSTALL_HINT = "pip install 'pianolm[eval]'"


class MetricsUnavailable(ImportError):
    """mir_eval is not installed; the message says what to install."""


def require_mir_eval() -> None:
    """Fail early, in one line, when mir_eval is missing (before any model runs)."""
    for name in ("mir_eval", "mir_eval.transcription", "mir_eval.transcription_velocity"):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise MetricsUnavailable(f"scoring needs mir_eval: {INSTALL_HINT} ({e})") from None


def reference_notes(notes: Iterable[Note], pedal: Iterable[tuple[float, float]] = ()
                    ) -> list[Note]:
    """Reference notes for scoring: offsets extended by the sustain pedal."""
    return extend_by_pedal(notes, pedal)


def _arrays(notes: Sequence[Note]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import mir_eval.util

    if not notes:
        return np.zeros((0, 2)), np.zeros(0), np.zeros(0)
    intervals = np.array([[n.onset, max(n.offset, n.onset + 1e-3)] for n in notes], float)
    pitches = mir_eval.util.midi_to_hz(np.array([n.pitch for n in notes], float))
    velocities = np.array([n.velocity for n in notes], float)
    return intervals, pitches, velocities


def _without_matching(out: dict[str, float], metrics: Sequence[str], pred: list, ref: list
                      ) -> dict[str, float]:
    """Scores where one side is empty: 1.0 when both are (nothing to find, nothing found),
    else 0.0 (mir_eval's convention, without its warning)."""
    score = 1.0 if not pred and not ref else 0.0
    for m in metrics:
        out.update({f"{m}_p": score, f"{m}_r": score, f"{m}_f": score})
    return out


def count_matched(pred: Sequence[Note], ref: Sequence[Note], seconds: float = 0.005,
                  velocity: int = 1) -> int:
    """Reference notes with a predicted note of the same pitch, onset and offset within
    `seconds` and velocity within `velocity`, each predicted note used once: how far two
    transcriptions of the same audio are the same notes (an imported model against its own
    tool), not a score against the truth."""
    free = list(pred)
    hits = 0
    for n in ref:
        for i, m in enumerate(free):
            if (m.pitch == n.pitch and abs(m.onset - n.onset) <= seconds
                    and abs(m.offset - n.offset) <= seconds
                    and abs(m.velocity - n.velocity) <= velocity):
                hits += 1
                del free[i]
                break
    return hits


def _onset_offset(ref_intervals: np.ndarray, ref_pitches: np.ndarray,
                  est_intervals: np.ndarray, est_pitches: np.ndarray, prefix: str,
                  onset_tolerance: float, offset_ratio: float, offset_min_tolerance: float
                  ) -> dict[str, float]:
    """`{prefix}onset_{p,r,f}` and `{prefix}onset_offset_{p,r,f}` (mir_eval.transcription)."""
    import mir_eval.transcription

    out = {}
    for name, ratio in (("onset", None), ("onset_offset", offset_ratio)):
        p, r, f, _ = mir_eval.transcription.precision_recall_f1_overlap(
            ref_intervals, ref_pitches, est_intervals, est_pitches,
            onset_tolerance=onset_tolerance, offset_ratio=ratio,
            offset_min_tolerance=offset_min_tolerance)
        out.update({f"{prefix}{name}_p": p, f"{prefix}{name}_r": r, f"{prefix}{name}_f": f})
    return out


def evaluate(notes_pred: Sequence[Note], notes_ref: Sequence[Note],
             onset_tolerance: float = ONSET_TOLERANCE, offset_ratio: float = OFFSET_RATIO,
             offset_min_tolerance: float = OFFSET_MIN_TOLERANCE) -> dict[str, float]:
    """Precision / recall / F1 for onset, onset+offset and onset+offset+velocity matching.

    Keys `{metric}_{p,r,f}` for metric in METRICS, plus `n_pred` and `n_ref`. When both lists
    are empty every score is 1.0 (nothing to find, nothing found); when exactly one is empty,
    0.0 (mir_eval's convention, without its warning).
    """
    require_mir_eval()
    import mir_eval.transcription
    import mir_eval.transcription_velocity

    pred, ref = list(notes_pred), list(notes_ref)
    out: dict[str, float] = {"n_pred": float(len(pred)), "n_ref": float(len(ref))}
    if not pred or not ref:
        return _without_matching(out, METRICS, pred, ref)
    ri, rp, rv = _arrays(ref)
    ei, ep, ev = _arrays(pred)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mir_eval warns about e.g. constant velocities
        out.update(_onset_offset(ri, rp, ei, ep, "", onset_tolerance, offset_ratio,
                                 offset_min_tolerance))
        p, r, f, _ = mir_eval.transcription_velocity.precision_recall_f1_overlap(
            ri, rp, rv, ei, ep, ev, onset_tolerance=onset_tolerance, offset_ratio=offset_ratio,
            offset_min_tolerance=offset_min_tolerance)
        out.update(onset_offset_velocity_p=p, onset_offset_velocity_r=r,
                   onset_offset_velocity_f=f)
    return {k: float(v) for k, v in out.items()}


def score_pedals(pred: Sequence[Pedal], ref: Sequence[Pedal],
                 onset_tolerance: float = ONSET_TOLERANCE, offset_ratio: float = OFFSET_RATIO,
                 offset_min_tolerance: float = OFFSET_MIN_TOLERANCE) -> dict[str, float]:
    """Precision / recall / F1 of sustain-pedal intervals, (down, up) in seconds.

    Keys `{metric}_{p,r,f}` for metric in PEDAL_METRICS (`pedal_onset`: down within
    `onset_tolerance`; `pedal_onset_offset`: and up within max(offset_min_tolerance,
    offset_ratio x the reference interval's length)), plus `pedal_n_pred` and `pedal_n_ref`:
    prefixed, so they merge with evaluate()'s keys into one row. Scored with
    mir_eval.transcription.precision_recall_f1_overlap on a constant dummy pitch (module doc:
    the defaults are the note tolerances; Kong et al. used a 200 ms onset tolerance). As in
    evaluate(): both lists empty -> every score 1.0; exactly one empty -> 0.0.
    """
    require_mir_eval()

    pred, ref = list(pred), list(ref)
    out: dict[str, float] = {"pedal_n_pred": float(len(pred)), "pedal_n_ref": float(len(ref))}
    if not pred or not ref:
        return _without_matching(out, PEDAL_METRICS, pred, ref)

    def arrays(pedals: list[Pedal]) -> tuple[np.ndarray, np.ndarray]:
        # at least 1 ms long, as notes in _arrays (mir_eval refuses zero-length intervals)
        intervals = np.array([[d, max(u, d + 1e-3)] for d, u in pedals], float)
        return intervals, np.ones(len(pedals))  # one dummy pitch (1 Hz, as Kong et al.)

    ri, rp = arrays(ref)
    ei, ep = arrays(pred)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out.update(_onset_offset(ri, rp, ei, ep, "pedal_", onset_tolerance, offset_ratio,
                                 offset_min_tolerance))
    return {k: float(v) for k, v in out.items()}


def score_notes(pred: Sequence[Note], ref: Sequence[Note]) -> dict[str, float]:
    """evaluate(), except that a flood of notes (an untrained encoder's rolls can hold tens of
    thousands of peaks) scores 0 at once instead of stalling mir_eval's matching. Such a flood
    has precision < 0.1 anyway; `n_pred` still tells how many notes there were."""
    if len(pred) > 10 * len(ref) + 500:
        zero = {f"{m}_{x}": 0.0 for m in METRICS for x in "prf"}
        return {**zero, "n_pred": float(len(pred)), "n_ref": float(len(ref))}
    return evaluate(pred, ref)


def mean_scores(scores: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Per-key mean over clips (the README reports the mean over the dev set's clips)."""
    rows = list(scores)
    if not rows:
        return {}
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def matched_pairs(notes_pred: Sequence[Note], notes_ref: Sequence[Note],
                  onset_tolerance: float = ONSET_TOLERANCE) -> list[tuple[Note, Note]]:
    """(predicted, reference) pairs that mir_eval matches on onset and pitch alone (the
    onset F1's matching), e.g. to study or calibrate velocities."""
    require_mir_eval()
    import mir_eval.transcription

    pred, ref = list(notes_pred), list(notes_ref)
    if not pred or not ref:
        return []
    ri, rp, _ = _arrays(ref)
    ei, ep, _ = _arrays(pred)
    matching = mir_eval.transcription.match_notes(ri, rp, ei, ep, onset_tolerance=onset_tolerance,
                                                  offset_ratio=None)
    return [(pred[j], ref[i]) for i, j in matching]


ERROR_KINDS = ("matched", "missed", "timing", "repeat", "octave", "chord_ghost", "isolated",
               "offset_early", "offset_late")


def note_errors(notes_pred: Sequence[Note], notes_ref: Sequence[Note],
                near: float = 0.15) -> dict[str, int]:
    """Where a transcription errs, as counts (ERROR_KINDS), on the onset F1's matching:
    - matched: predicted notes matched to a reference note (onset within 50 ms, same key);
      offset_early / offset_late: of those, the ones whose offset misses the onset+offset
      F1's tolerance, before or after the reference's;
    - missed: reference notes no prediction matched;
    - each unmatched prediction, by the first that applies: timing (the same key's reference
      onset within `near` s, itself unmatched: a note placed too early or late), repeat (the
      same, but that reference note is matched: a second strike), octave (a reference onset
      within 50 ms an octave or two away, or a twelfth), chord_ghost (another key's reference
      onset within 50 ms), isolated (no reference onset near)."""
    pairs = matched_pairs(notes_pred, notes_ref)
    out = dict.fromkeys(ERROR_KINDS, 0)
    out["matched"], out["missed"] = len(pairs), len(notes_ref) - len(pairs)
    for pred, ref in pairs:
        tolerance = max(OFFSET_MIN_TOLERANCE, OFFSET_RATIO * (ref.offset - ref.onset))
        if abs(pred.offset - ref.offset) > tolerance:
            out["offset_early" if pred.offset < ref.offset else "offset_late"] += 1
    taken_pred = {id(p) for p, _ in pairs}
    taken_ref = {id(r) for _, r in pairs}
    for pred in notes_pred:
        if id(pred) in taken_pred:
            continue
        same = [r for r in notes_ref if r.pitch == pred.pitch and abs(r.onset - pred.onset) <= near]
        close = [r for r in notes_ref if abs(r.onset - pred.onset) <= ONSET_TOLERANCE]
        if same:
            out["repeat" if all(id(r) in taken_ref for r in same) else "timing"] += 1
        elif any(abs(r.pitch - pred.pitch) in (12, 19, 24) for r in close):
            out["octave"] += 1
        elif close:
            out["chord_ghost"] += 1
        else:
            out["isolated"] += 1
    return out
