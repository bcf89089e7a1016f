"""Frame-level piano-roll targets for training the roll-based encoders.

    cfg = TargetConfig(frames_per_second=encoder.frames_per_second)
    t = roll_targets(extend_by_pedal(notes, pedal), n_frames, cfg, start=crop_start_s)
    t.onset, t.offset, t.frame, t.velocity, t.velocity_mask   # float32 [n_frames, 88]

Frame i is centred at `start + i / fps` (the encoders' frames are centred: T = samples // hop
+ 1). Notes must be pedal-extended already (docs/model.md "Reference offsets"), which also
ends a held note when its key is struck again.

Onset / offset targets: Kong et al.'s regression targets (soft, default) -- a triangle
1 - |t_i - t_event| / width around each event, maximum over notes -- rather than binary
frames. Why soft: (1) the triangle's two flanks encode where inside a frame the event lies, so
roll decoding recovers onsets to a fraction of a frame (Kong's sub-frame refinement,
runtime/rolls.py), and (2) for HPPNet at 50 frames/s the language model reads these very rolls
as its embedding while it must name onsets on a 10 ms grid: with binary 20 ms frames the
half-frame information would be gone. Kong reports the regression targets beating binary ones;
`soft=False` gives onsets-and-frames style binary targets for comparison.

Frame target: binary, frames round(onset * fps) <= i < round(offset * fps) (at least the onset
frame), so the frame disappears exactly at the offset frame. Velocity: velocity / 127 on the
frames within `velocity_radius` of the onset frame, where `velocity_mask` is 1; the velocity
loss is taken there only (Kong masks it with the onset roll). A little wider than one frame
since decoding reads the velocity at the detected onset peak, which may be a frame off.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from pianolm.runtime.notes import Note
from pianolm.runtime.vocab import MAX_PITCH, MIN_PITCH, NUM_PITCHES

ROLL_NAMES = ("onset", "offset", "frame", "velocity")


@dataclass(frozen=True)
class TargetConfig:
    frames_per_second: float
    soft: bool = True  # Kong's triangular regression targets for onsets and offsets
    onset_width: float = 0.05  # seconds: triangle half-width (Kong: J = 5 frames at 100 fps)
    offset_width: float = 0.05
    velocity_radius: int = 1  # frames either side of the onset frame that carry the velocity


@dataclass
class RollTargets:
    onset: np.ndarray
    offset: np.ndarray
    frame: np.ndarray
    velocity: np.ndarray
    velocity_mask: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"onset": self.onset, "offset": self.offset, "frame": self.frame,
                "velocity": self.velocity, "velocity_mask": self.velocity_mask}

    @classmethod
    def stack(cls, items: list[RollTargets]) -> dict[str, np.ndarray]:
        """Batch: each field as [B, T, 88]."""
        return {k: np.stack([it.as_dict()[k] for it in items]) for k in items[0].as_dict()}


def _event(roll: np.ndarray, key: int, t: float, fps: float, cfg: TargetConfig,
           width: float) -> None:
    """Write one onset or offset at time t (seconds from the first frame) into roll[:, key]."""
    n = roll.shape[0]
    pos = t * fps
    if not cfg.soft:
        i = int(math.floor(pos + 0.5))
        if 0 <= i < n:
            roll[i, key] = 1.0
        return
    w = width * fps  # half-width in frames
    lo, hi = max(0, math.ceil(pos - w)), min(n - 1, math.floor(pos + w))
    if lo > hi:
        return
    idx = np.arange(lo, hi + 1)
    tri = np.clip(1.0 - np.abs(idx - pos) / w, 0.0, 1.0).astype(np.float32)
    np.maximum(roll[lo:hi + 1, key], tri, out=roll[lo:hi + 1, key])


def roll_targets(notes: Iterable[Note], n_frames: int, cfg: TargetConfig,
                 start: float = 0.0) -> RollTargets:
    """Targets for `n_frames` frames starting at `start` seconds (notes pedal-extended).

    Notes outside 21..108 are ignored; notes partly inside the window contribute the part
    inside (a note sounding since before `start` has frames but no onset peak).
    """
    fps = float(cfg.frames_per_second)
    shape = (n_frames, NUM_PITCHES)
    onset, offset, frame = (np.zeros(shape, np.float32) for _ in range(3))
    velocity, vmask = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    end = start + (n_frames - 0.5) / fps
    for note in notes:
        if not MIN_PITCH <= note.pitch <= MAX_PITCH:
            continue
        on, off = note.onset - start, max(note.offset, note.onset) - start
        if off < -max(cfg.offset_width, 0.5 / fps) or note.onset > end + cfg.onset_width:
            continue
        key = note.pitch - MIN_PITCH
        _event(onset, key, on, fps, cfg, cfg.onset_width)
        _event(offset, key, off, fps, cfg, cfg.offset_width)
        first = int(math.floor(on * fps + 0.5))
        last = max(int(math.floor(off * fps + 0.5)), first + 1)  # exclusive
        frame[max(first, 0):max(min(last, n_frames), 0), key] = 1.0
        lo, hi = max(first - cfg.velocity_radius, 0), min(first + cfg.velocity_radius + 1,
                                                          n_frames)
        if lo < hi:
            velocity[lo:hi, key] = min(max(note.velocity, 0), 127) / 127.0
            vmask[lo:hi, key] = 1.0
    return RollTargets(onset, offset, frame, velocity, vmask)
