"""Roll decoding: the encoder's own transcription, without the language model.

Kong et al. (2021) / onsets-and-frames style: an onset is a local maximum of the onset roll
above `onset_threshold`; the note lasts while its frame roll stays above `frame_threshold`; it
ends at an offset peak (when that comes well before the frame disappears, as Kong decides), at
the frame's disappearance, or at the next onset of the same key, whichever comes first.
Velocity is read from the velocity roll at the onset frame (x 127), then mapped through
`velocity_curve` when the config has one (a polynomial fitted on validation pieces: the roll
regresses toward the mean, so loud notes read soft). With Kong's triangular
regression targets (export/train/targets.py) the onset and offset times are refined to a
fraction of a frame from the peak's neighbours.

This is the baseline the paper's claim is measured against: LM decoding vs roll decoding of the
same encoder. Thresholds are tuned on the training data's validation split (never the dev set)
and stored with the encoder.

NumPy only: the runtime never imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .notes import Note
from .vocab import MIN_PITCH, NUM_PITCHES, SEGMENT_SECONDS

ROLL_KEYS = ("onset", "offset", "frame", "velocity")


@dataclass(frozen=True)
class RollDecodeConfig:
    onset_threshold: float = 0.3  # Kong's defaults
    offset_threshold: float = 0.3
    frame_threshold: float = 0.1
    peak_radius: int = 2  # a peak is the maximum within +-radius frames
    subframe: bool = True  # refine onset / offset times from the peak's neighbours
    max_note_seconds: float | None = None  # safety net against a stuck frame roll
    # numpy.polyval coefficients (highest power first) from the roll's velocity x 127 to the
    # MIDI velocity written; () = the roll's own value
    velocity_curve: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        return {**asdict(self), "velocity_curve": list(self.velocity_curve)}

    @classmethod
    def from_dict(cls, d: Mapping) -> RollDecodeConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        if "velocity_curve" in values:  # JSON gives a list
            values["velocity_curve"] = tuple(float(c) for c in values["velocity_curve"])
        return cls(**values)

    def velocity(self, roll_value: float) -> int:
        """The MIDI velocity (1..127) of a note whose velocity roll reads `roll_value` (0..1)."""
        v = roll_value * 127
        if self.velocity_curve:
            v = float(np.polyval(self.velocity_curve, v))
        return int(np.clip(round(v), 1, 127))


def find_peaks(roll: np.ndarray, threshold: float, radius: int = 2) -> np.ndarray:
    """bool [T, K]: x > threshold and x is the maximum of its +-radius window along time.

    On a plateau the last frame wins (>= the frames before, > the frames after), so a flat top
    gives exactly one peak (the sub-frame shift then moves it back by half a frame).
    """
    x = np.asarray(roll, dtype=np.float32)
    if x.shape[0] == 0:
        return np.zeros(x.shape, bool)
    r = max(int(radius), 1)
    pad = np.pad(x, ((r, r), (0, 0)), constant_values=-np.inf)
    win = sliding_window_view(pad, r, axis=0)  # [T + r + 1, K, r]: windows of r frames
    before = win[: x.shape[0]].max(axis=-1)  # frames i-r .. i-1
    after = win[r + 1: r + 1 + x.shape[0]].max(axis=-1)  # frames i+1 .. i+r
    return (x > threshold) & (x >= before) & (x > after)


def subframe_shift(roll: np.ndarray, i: int, k: int) -> float:
    """Kong's refinement: where (in frames, -0.5..0.5) the peak of a triangle lies around i.

    Exact for a triangle sampled at three frames; 0 at the roll's edges.
    """
    if i <= 0 or i >= roll.shape[0] - 1:
        return 0.0
    a, b, c = float(roll[i - 1, k]), float(roll[i, k]), float(roll[i + 1, k])
    if c > a:
        den = b - a
        shift = (c - a) / den / 2 if den > 0 else 0.0
    else:
        den = b - c
        shift = (c - a) / den / 2 if den > 0 else 0.0
    return float(np.clip(shift, -0.5, 0.5))


def _first_after(sorted_idx: np.ndarray, i: int) -> int | None:
    j = int(np.searchsorted(sorted_idx, i, side="right"))
    return int(sorted_idx[j]) if j < len(sorted_idx) else None


def decode_rolls(rolls: Mapping[str, np.ndarray], frames_per_second: float,
                 config: RollDecodeConfig | None = None, start: float = 0.0) -> list[Note]:
    """Rolls {onset, offset, frame, velocity: [T, 88] in 0..1} -> notes (seconds from `start`,
    frame i at start + i / fps), sorted by (onset, pitch)."""
    cfg = config or RollDecodeConfig()
    onset = np.asarray(rolls["onset"], np.float32)
    offset = np.asarray(rolls["offset"], np.float32)
    frame = np.asarray(rolls["frame"], np.float32)
    velocity = np.asarray(rolls["velocity"], np.float32)
    n, keys = onset.shape
    if keys != NUM_PITCHES or any(r.shape != onset.shape for r in (offset, frame, velocity)):
        raise ValueError(f"rolls must all be [T, {NUM_PITCHES}], got "
                         f"{[np.shape(rolls[k]) for k in ROLL_KEYS]}")
    fps = float(frames_per_second)
    max_len = None if cfg.max_note_seconds is None else max(int(cfg.max_note_seconds * fps), 1)
    on_peaks = find_peaks(onset, cfg.onset_threshold, cfg.peak_radius)
    off_peaks = find_peaks(offset, cfg.offset_threshold, cfg.peak_radius)
    below = frame <= cfg.frame_threshold

    def on_time(i: int, k: int) -> float:
        return (i + (subframe_shift(onset, i, k) if cfg.subframe else 0.0)) / fps

    notes: list[Note] = []
    for k in np.flatnonzero(on_peaks.any(axis=0)):
        starts = np.flatnonzero(on_peaks[:, k])
        offs = np.flatnonzero(off_peaks[:, k])
        gone = np.flatnonzero(below[:, k])
        for j, bgn in enumerate(starts):
            bgn = int(bgn)
            t_on = on_time(bgn, k)
            nxt = int(starts[j + 1]) if j + 1 < len(starts) else None
            fd = _first_after(gone, bgn)  # the frame roll disappears
            oo = _first_after(offs, bgn)  # an offset peak
            limit = n - 1 if max_len is None else min(n - 1, bgn + max_len)
            if nxt is not None and (fd is None or nxt <= fd) and nxt <= limit:
                t_off = on_time(nxt, k)  # the key is struck again: the note ends there
            elif fd is not None and fd <= limit:
                if oo is not None and oo <= fd and oo - bgn > fd - oo:
                    shift = subframe_shift(offset, oo, k) if cfg.subframe else 0.0
                    t_off = (oo + shift) / fps
                else:
                    t_off = fd / fps
            else:
                t_off = limit / fps if limit > bgn else (bgn + 1) / fps
            t_off = max(t_off, t_on + 1.0 / fps / 2)
            vel = cfg.velocity(float(velocity[bgn, k]))
            notes.append(Note(start + t_on, start + t_off, int(k) + MIN_PITCH, vel))
    notes.sort(key=lambda x: (x.onset, x.pitch, x.offset, x.velocity))
    return notes


def join_segments(rolls: Mapping[str, np.ndarray], frames_per_second: float,
                  n_samples: int | None = None, sample_rate: int = 16000
                  ) -> dict[str, np.ndarray]:
    """Per-segment rolls [S, T, 88] of consecutive 10 s segments -> one timeline [T', 88].

    A segment of 10 s has 10 * fps + 1 centred frames; its last frame is the next segment's
    first, so every segment but the last keeps 10 * fps frames. With `n_samples` (the audio's
    length) the zero padding after the audio's end is cut (samples // hop + 1 frames).
    """
    hop = int(round(SEGMENT_SECONDS * frames_per_second))
    out = {}
    for key, r in rolls.items():
        r = np.asarray(r)
        parts: Sequence[np.ndarray] = [r[s, :hop] for s in range(r.shape[0] - 1)] + [r[-1]]
        joined = np.concatenate(parts, axis=0)
        if n_samples is not None:
            frames = int(n_samples) * int(round(frames_per_second)) // sample_rate + 1
            joined = joined[:frames]
        out[key] = joined
    return out
