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

from .notes import Note, sort_notes
from .vocab import MIN_PITCH, NUM_PITCHES, SEGMENT_SECONDS

ROLL_KEYS = ("onset", "offset", "frame", "velocity")
# An encoder with a sustain-pedal model (Kong et al.'s Regress_pedal_CRNN) also outputs these,
# each [batch, frames, 1] in 0..1 (runtime/graphs.py ENCODER_PEDAL_IO).
PEDAL_KEYS = ("pedal_onset", "pedal_offset", "pedal_frame")
ROLL_METHODS = ("pianolm", "kong")  # decode_rolls; runtime/kong_rolls.py (Kong's own rules)


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
    # "pianolm": decode_rolls below; "kong": Kong et al.'s RegressionPostProcessor, rule for
    # rule (runtime/kong_rolls.py), which reads the pedal thresholds too
    method: str = "pianolm"
    pedal_offset_threshold: float = 0.2  # Kong's values
    pedal_frame_threshold: float = 0.5

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


def note_rolls(rolls: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """The onset, offset, frame and velocity rolls as float32 [T, 88], checked (ValueError)."""
    out = tuple(np.asarray(rolls[k], np.float32) for k in ROLL_KEYS)
    if out[0].ndim != 2 or out[0].shape[1] != NUM_PITCHES or any(
            r.shape != out[0].shape for r in out[1:]):
        raise ValueError(f"rolls must all be [T, {NUM_PITCHES}], got {[r.shape for r in out]}")
    return out


def decode_rolls(rolls: Mapping[str, np.ndarray], frames_per_second: float,
                 config: RollDecodeConfig | None = None, start: float = 0.0) -> list[Note]:
    """Rolls {onset, offset, frame, velocity: [T, 88] in 0..1} -> notes (seconds from `start`,
    frame i at start + i / fps), sorted by (onset, pitch)."""
    cfg = config or RollDecodeConfig()
    onset, offset, frame, velocity = note_rolls(rolls)
    n = onset.shape[0]
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
    return sort_notes(notes)


def kept_frames(index: int, count: int, frames_per_second: float, n_samples: int | None = None,
                last_start: int | None = None, sample_rate: int = 16000) -> slice:
    """Which of segment `index`'s frames (of `count` consecutive segments) the joined timeline
    keeps.

    A 10 s segment has 10 * fps + 1 centred frames; its last frame is the next segment's
    first, so every segment but the last keeps 10 * fps frames. The last keeps the rest: after
    `last_start` (audio.tail_start: it overlaps the one before, whose frames win up to the
    boundary) and up to the audio's end (`n_samples`: samples // hop + 1 frames in all).
    """
    hop = int(round(SEGMENT_SECONDS * frames_per_second))
    if index < count - 1:
        return slice(0, hop)
    skip = 0
    if last_start is not None and count > 1:
        skip = ((count - 1) * round(SEGMENT_SECONDS * sample_rate) - int(last_start)) \
            * int(round(frames_per_second)) // sample_rate
    stop = None
    if n_samples is not None:
        frames = int(n_samples) * int(round(frames_per_second)) // sample_rate + 1
        stop = skip + frames - index * hop
    return slice(skip, stop)


def join_segments(rolls: Mapping[str, np.ndarray], frames_per_second: float,
                  n_samples: int | None = None, sample_rate: int = 16000,
                  last_start: int | None = None) -> dict[str, np.ndarray]:
    """Per-segment rolls [S, T, 88] of consecutive 10 s segments -> one timeline [T', 88]
    (kept_frames of each: with `n_samples` the zero padding after the audio's end is cut;
    with `last_start` the last segment is the end-aligned one of audio.tail_start)."""
    out = {}
    for key, r in rolls.items():
        r = np.asarray(r)
        count = r.shape[0]
        parts: Sequence[np.ndarray] = [
            r[s, kept_frames(s, count, frames_per_second, n_samples, last_start, sample_rate)]
            for s in range(count)]
        out[key] = np.concatenate(parts, axis=0)
    return out


@dataclass
class _Sounding:
    """A note RollStream has started but whose end it has not seen yet."""

    bgn: int  # onset frame (global)
    t_on: float  # seconds from the stream's start, refined
    velocity: int
    first_off_peak: tuple[int, float] | None = None  # (frame, refined seconds) after bgn


class RollStream:
    """decode_rolls over a timeline that arrives a piece at a time, with flat memory.

        stream = RollStream(fps, config)
        for piece in pieces:                 # {onset, offset, frame, velocity: [t, 88]}
            stream.push(piece)
        notes = stream.finish()              # == decode_rolls(concatenated pieces, fps, config)

    The notes equal decode_rolls' on the whole timeline exactly (tests/test_rolls_stream.py):
    a frame is decided once the peak radius after it is known, and per key a note stays open
    (carried, as the LM path carries its open notes) until its end event arrives: the key
    struck again, its frame roll gone, or max_note_seconds. Only radius + 1 frames of rolls
    are kept between pushes, so an hour of audio costs no more memory than a minute.

    A live stream (runtime/stream.py) wants each note twice: when its onset is decided and
    when its end is. With `track_starts`, drain() hands over both since the last drain.
    """

    def __init__(self, frames_per_second: float, config: RollDecodeConfig | None = None,
                 start: float = 0.0, track_starts: bool = False) -> None:
        self.cfg = config or RollDecodeConfig()
        self.fps = float(frames_per_second)
        self.start = start
        self.radius = max(int(self.cfg.peak_radius), 1)
        m = self.cfg.max_note_seconds
        self.max_len = None if m is None else max(int(m * self.fps), 1)
        self._buf = {k: np.zeros((0, NUM_PITCHES), np.float32) for k in ROLL_KEYS}
        self._buf0 = 0  # global index of the buffer's first frame
        self._total = 0  # frames pushed
        self._done = 0  # frames decided
        self._open: dict[int, _Sounding] = {}
        self._notes: list[Note] = []
        # notes started since the last drain (offset = onset: the end is not known yet)
        self._started: list[Note] | None = [] if track_starts else None

    def push(self, rolls: Mapping[str, np.ndarray]) -> None:
        pieces = {k: np.asarray(rolls[k], np.float32) for k in ROLL_KEYS}
        n = pieces["onset"].shape[0]
        if any(p.shape != (n, NUM_PITCHES) for p in pieces.values()):
            raise ValueError(f"rolls must all be [T, {NUM_PITCHES}], got "
                             f"{[p.shape for p in pieces.values()]}")
        self._buf = {k: np.concatenate([self._buf[k], pieces[k]]) for k in ROLL_KEYS}
        self._total += n
        self._decide(self._total - self.radius, final=False)

    def finish(self) -> list[Note]:
        """Decide the last frames (every note still sounding ends there); the notes, sorted."""
        self._decide(self._total, final=True)
        assert not self._open
        notes, self._notes = self._notes, []
        return sort_notes(notes)

    def drain(self) -> tuple[list[Note], list[Note]]:
        """(notes started, notes ended) since the last drain, each in (onset, pitch) order; a
        started note's offset is its onset. Needs track_starts. After finish(), which returns
        the notes not drained yet, drain() still gives the notes its last frames started."""
        if self._started is None:
            raise ValueError("RollStream(track_starts=True) is needed to drain started notes")
        started, ended = self._started, self._notes
        self._started, self._notes = [], []
        return sort_notes(started), sort_notes(ended)

    # -- internals: frames [self._done, upto) become decided

    def _window(self, key: str, lo: int, hi: int, final: bool) -> np.ndarray:
        """Frames lo - r .. hi + r of one roll, -inf beyond the timeline's ends."""
        r, b0 = self.radius, self._buf0
        x = self._buf[key]
        head = max(r - lo, 0)  # before frame 0
        tail = max(hi + r - self._total, 0) if final else 0
        body = x[max(lo - r, 0) - b0: min(hi + r, self._total) - b0]
        return np.concatenate([np.full((head, NUM_PITCHES), -np.inf, np.float32), body,
                               np.full((tail, NUM_PITCHES), -np.inf, np.float32)])

    def _peaks(self, key: str, threshold: float, lo: int, hi: int, final: bool) -> np.ndarray:
        w = self._window(key, lo, hi, final)
        r, n = self.radius, hi - lo
        x = w[r: r + n]
        win = sliding_window_view(w, r, axis=0)
        return (x > threshold) & (x >= win[:n].max(axis=-1)) & (x > win[r + 1: r + 1 + n].max(
            axis=-1))

    def _shift(self, key: str, i: int, k: int, final: bool) -> float:
        """subframe_shift at global frame i (0 at the timeline's first and last frames)."""
        if not self.cfg.subframe or i <= 0 or (final and i >= self._total - 1):
            return 0.0
        roll = self._buf[key][i - 1 - self._buf0: i + 2 - self._buf0]
        return subframe_shift(roll, 1, k)

    def _close(self, k: int, note: _Sounding, t_off: float) -> None:
        t_off = max(t_off, note.t_on + 1.0 / self.fps / 2)
        self._notes.append(Note(self.start + note.t_on, self.start + t_off, int(k) + MIN_PITCH,
                                note.velocity))

    def _decide(self, upto: int, final: bool) -> None:
        lo, hi = self._done, max(upto, self._done)
        if hi > lo:
            cfg = self.cfg
            on_peaks = self._peaks("onset", cfg.onset_threshold, lo, hi, final)
            off_peaks = self._peaks("offset", cfg.offset_threshold, lo, hi, final)
            below = self._buf["frame"][lo - self._buf0: hi - self._buf0] <= cfg.frame_threshold
            keys = set(np.flatnonzero(on_peaks.any(axis=0)).tolist()) | set(self._open)
            for k in sorted(keys):
                self._key(k, lo + np.flatnonzero(on_peaks[:, k]), lo + np.flatnonzero(below[:, k]),
                          lo + np.flatnonzero(off_peaks[:, k]), hi, final)
            self._done = hi
        keep = max(self._done - self.radius - 1, self._buf0)  # the window before, the shift
        self._buf = {k: v[keep - self._buf0:] for k, v in self._buf.items()}
        self._buf0 = keep

    def _key(self, k: int, starts: np.ndarray, gone: np.ndarray, offs: np.ndarray, hi: int,
             final: bool) -> None:
        """decode_rolls' rule for one key, over its events in the frames just decided."""
        j = 0
        note = self._open.pop(k, None)
        while True:
            if note is None:
                if j == len(starts):
                    return
                bgn = int(starts[j])
                j += 1
                t_on = (bgn + self._shift("onset", bgn, k, final)) / self.fps
                vel = self.cfg.velocity(float(self._buf["velocity"][bgn - self._buf0, k]))
                note = _Sounding(bgn, t_on, vel)
                if self._started is not None:
                    on = self.start + t_on
                    self._started.append(Note(on, on, int(k) + MIN_PITCH, vel))
            bgn = note.bgn
            if note.first_off_peak is None:
                oo = _first_after(offs, bgn)
                if oo is not None:
                    note.first_off_peak = (oo, (oo + self._shift("offset", oo, k, final))
                                           / self.fps)
            nxt = int(starts[j]) if j < len(starts) else None
            fd = _first_after(gone, bgn)
            limit = None if self.max_len is None else bgn + self.max_len
            if nxt is not None and (fd is None or nxt <= fd) and (limit is None or nxt <= limit):
                self._close(k, note, (nxt + self._shift("onset", nxt, k, final)) / self.fps)
            elif fd is not None and (limit is None or fd <= limit):
                oo_t = note.first_off_peak
                if oo_t is not None and oo_t[0] <= fd and oo_t[0] - bgn > fd - oo_t[0]:
                    self._close(k, note, oo_t[1])
                else:
                    self._close(k, note, fd / self.fps)
            elif final or (limit is not None and limit < hi):
                # no end event before the limit (or before the timeline's last frame)
                last = self._total - 1 if limit is None else min(limit, self._total - 1)
                self._close(k, note, (last if last > bgn else bgn + 1) / self.fps)
            else:
                self._open[k] = note  # still sounding: carried to the next push
                return
            note = None
