"""Kong et al.'s roll post-processing, rule for rule, in NumPy.

Our own re-implementation of what `piano_transcription_inference` 0.0.6 does with its
Regress_onset_offset_frame_velocity_CRNN / Note_pedal outputs (utilities.py
RegressionPostProcessor, piano_vad.py note_detection_with_onset_offset_regress and
pedal_detection_with_onset_offset_regress, inference.py PianoTranscription.enframe / deframe),
so that a Kong-style encoder decoded by pianolm gives Kong's notes (tests/test_kong_rolls.py
compares the two). NumPy only: the runtime never imports torch, nor Kong's package.

Rules (T frames, per key k; `x` a regression roll):

1. Peaks. Frame n in [neighbour, T - neighbour) is a peak when x[n] > threshold and x is
   monotonic over +-neighbour frames: x[n-i] >= x[n-i-1] and x[n+i] >= x[n+i+1] for
   i < neighbour (so a plateau's frames can all be peaks). neighbour = 2 for onsets, 4 for
   offsets and pedal offsets. Vectorised with sliding windows over the step comparisons.
2. Sub-frame shift at a peak: (x[n+1] - x[n-1]) / (x[n] - x[n+1]) / 2 when x[n-1] > x[n+1],
   else (x[n+1] - x[n-1]) / (x[n] - x[n-1]) / 2, in float32 as Kong computes it.
   DIFFERENCE: on a three-frame plateau (x[n-1] == x[n] == x[n+1]) Kong divides 0 by 0 and
   emits a NaN time; we use shift 0 there (the only case whose denominator can be 0).
3. Notes, per key, a state machine over the key's event frames only (onset peaks, offset
   peaks, the frames where the frame roll drops to <= frame_threshold), in Kong's order of
   tests within a frame (onset, then disappearance, then the cap):
   - an onset peak opens a note at bgn; a note already open (re-strike) closes at
     max(i - 1, 0) with offset shift 0;
   - fd = the first frame > bgn with frame <= frame_threshold; oo = the first offset peak in
     (bgn, fd]. At fd the note ends at oo if oo - bgn > fd - oo, else at fd;
   - a note still open 600 frames after bgn (Kong counts frames: 6 s at 100 fps), or at the
     last frame, ends there;
   - the offset shift is the offset roll's peak shift at the end frame (0 unless the end
     frame is an offset peak); the onset shift is the onset peak's.
   Kong's `if bgn:` tests read frame 0 as "no onset"; onset peaks need 2 frames before them, so
   an onset is never at frame 0 and the quirk never bites: we keep it implicitly.
4. Times: (frame + shift) / fps + start. Kong casts them to float32; we keep float64.
   Velocity: int(v * 128) (Kong's velocity_scale) read at the onset frame, clipped to 0..127
   (Kong does not clip: a roll of 1.0 gives 128 there).
   DIFFERENCE: Kong can end a note before it starts (a re-strike at the next frame, or a
   negative offset shift at a note ending one frame after its onset); our Note must have
   offset >= onset (runtime/midi.py refuses otherwise), so such an offset is clamped to the
   onset.
5. Pedal: a press begins at frame i >= 1 where pedal_frame[i] >= pedal_frame_threshold (0.5)
   and pedal_frame[i] > pedal_frame[i-1], only when no press is open (onset shift 0). It ends
   at the first pedal-offset peak after it (threshold pedal_offset_threshold, neighbour 4),
   with that peak's shift; or, when none comes, 10 frames after the pedal frame first fell to
   <= pedal_frame_threshold, at the frame where it fell (with the offset shift there, as Kong
   does). The pedal-onset roll is not read (Kong found the frame roll better). A press still
   open at the end of the rolls is dropped, as Kong drops it.
6. Segmenting (enframe / deframe): the audio is zero-padded to a multiple of the 10 s segment
   and cut into 10 s windows with a 5 s hop; each window's rolls have F = 10 * fps + 1 frames.
   With one window all F frames are kept; otherwise every window's last frame is dropped and
   window 0 keeps [0, 0.75 (F-1)), middle windows [0.25 (F-1), 0.75 (F-1)), the last
   [0.25 (F-1), F-1). Kong's deframe does not trim the rolls to the audio's length (its
   `[0:audio_len]` slices frames by a sample count, a no-op), so notes may lie in the zero
   padding; we keep that (a caller that wants them gone trims the notes). Empty audio is one
   silent window here (Kong's enframe fails on it).

Where this differs from pianolm's own decode_rolls (runtime/rolls.py): peaks are monotonic
neighbourhoods (ties allowed, so plateaus give several peaks) rather than strict window
maxima with a configurable radius; offsets use a radius of 4; the re-strike ends the note one
frame before the new onset (not at its refined time); the 600-frame cap always applies
(max_note_seconds is not read); velocity is int(v * 128) (velocity_curve is not read); there
is no minimum note length; and there is a sustain-pedal decoder. RollDecodeConfig's
peak_radius, subframe, max_note_seconds, velocity_curve and method are not read here.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .notes import Note, Pedal, sort_notes
from .rolls import RollDecodeConfig, note_rolls
from .vocab import MIN_PITCH, NUM_PITCHES

ONSET_NEIGHBOUR = 2  # frames either side that must be monotonic around an onset peak
OFFSET_NEIGHBOUR = 4  # the same for note offsets and pedal offsets
MAX_NOTE_FRAMES = 600  # Kong closes a note still sounding after this many frames
PEDAL_RELEASE_FRAMES = 10  # frames of pedal absence, without an offset peak, that end a press
VELOCITY_SCALE = 128  # Kong's config.velocity_scale
KONG_SAMPLE_RATE = 16000
KONG_SEGMENT_SAMPLES = 10 * KONG_SAMPLE_RATE  # 10 s windows, 5 s hop


@dataclass(frozen=True)
class Peaks:
    """Peak frames of a roll [T, K] and their sub-frame shifts (float32, 0 off the peaks)."""

    mask: np.ndarray  # bool [T, K]
    shift: np.ndarray  # float32 [T, K]


def kong_peaks(roll: np.ndarray, threshold: float, neighbour: int) -> Peaks:
    """Kong's get_binarized_output_from_regression on a roll [T, K] (or [T]: taken as [T, 1])."""
    x = np.asarray(roll, np.float32)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"roll must be [T] or [T, K], got {np.shape(roll)}")
    if neighbour < 1:
        raise ValueError(f"neighbour must be >= 1, got {neighbour}")
    t, n = x.shape[0], int(neighbour)
    mask = np.zeros(x.shape, bool)
    shift = np.zeros(x.shape, np.float32)
    m = t - 2 * n  # candidate frames n .. t-n-1
    if m <= 0:
        return Peaks(mask, shift)
    # `not a < b` rather than `a >= b`: the same as Kong's tests, NaN included
    rising = ~(x[1:] < x[:-1])  # [t-1]: step j -> j+1 does not fall
    falling = ~(x[:-1] < x[1:])  # [t-1]: step j -> j+1 does not rise
    # frame c = s + n: steps c-n .. c-1 rise (window s) and steps c .. c+n-1 fall (window s+n)
    left = sliding_window_view(rising, n, axis=0)[:m].all(axis=-1)
    right = sliding_window_view(falling, n, axis=0)[n:n + m].all(axis=-1)
    mask[n:t - n] = (x[n:t - n] > threshold) & left & right
    f, k = np.nonzero(mask)
    a, b, c = x[f - 1, k], x[f, k], x[f + 1, k]
    den = np.where(a > c, b - c, b - a)
    flat = den == 0  # only a 3-frame plateau: Kong's 0 / 0 = NaN, our shift 0
    shift[f, k] = np.where(flat, np.float32(0), (c - a) / np.where(flat, 1, den) / 2)
    return Peaks(mask, shift)


def _per_key(mask: np.ndarray) -> list[list[int]]:
    """The sorted frames of `mask` [T, K] that are set, one list per key."""
    keys, frames = np.nonzero(mask.T)  # key-major, frames ascending within a key
    bounds = np.searchsorted(keys, np.arange(mask.shape[1] + 1))
    frames = frames.tolist()
    return [frames[bounds[k]:bounds[k + 1]] for k in range(mask.shape[1])]


def _first_after(sorted_frames: list[int], i: int) -> int | None:
    j = bisect_right(sorted_frames, i)
    return sorted_frames[j] if j < len(sorted_frames) else None


def _first_below_after(below: np.ndarray, drops: list[int], i: int) -> int | None:
    """The first frame > i where `below` [T] is set: i+1 itself, or the start of a later run."""
    if i + 1 < below.shape[0] and below[i + 1]:
        return i + 1
    return _first_after(drops, i)


def _run_starts(below: np.ndarray) -> np.ndarray:
    """bool like `below`: the first frame of each run of set frames (along axis 0)."""
    starts = below.copy()
    starts[1:] &= ~below[:-1]
    return starts


def _velocity(v: float) -> int:
    return int(np.clip(int(v * VELOCITY_SCALE), 0, 127))


def kong_notes(rolls: Mapping[str, np.ndarray], frames_per_second: float,
               config: RollDecodeConfig | None = None, start: float = 0.0) -> list[Note]:
    """Rolls {onset, offset, frame, velocity: [T, 88] in 0..1} -> Kong's notes (seconds from
    `start`, frame i at start + i / fps), sorted by runtime.notes.sort_notes."""
    cfg = config or RollDecodeConfig()
    onset, offset, frame, velocity = note_rolls(rolls)
    t = onset.shape[0]
    fps = float(frames_per_second)
    on = kong_peaks(onset, cfg.onset_threshold, ONSET_NEIGHBOUR)
    off = kong_peaks(offset, cfg.offset_threshold, OFFSET_NEIGHBOUR)
    below = frame <= cfg.frame_threshold
    on_frames = _per_key(on.mask)
    off_frames = _per_key(off.mask)
    drops = _per_key(_run_starts(below))

    notes: list[Note] = []
    for k in range(NUM_PITCHES):
        starts = on_frames[k]
        for j, bgn in enumerate(starts):
            nxt = starts[j + 1] if j + 1 < len(starts) else None
            cap = min(bgn + MAX_NOTE_FRAMES, t - 1)
            fd = _first_below_after(below[:, k], drops[k], bgn)
            # Kong tests, within a frame, the onset first, then disappearance, then the cap;
            # whichever frame comes first ends the note (ties in that order)
            if nxt is not None and nxt <= cap and (fd is None or nxt <= fd):
                fin, fin_shift = max(nxt - 1, 0), 0.0  # re-strike: the next onset reopens
            else:
                if fd is not None and fd <= cap:
                    oo = _first_after(off_frames[k], bgn)
                    use_oo = oo is not None and oo <= fd and oo - bgn > fd - oo
                    fin = oo if use_oo else fd
                else:
                    fin = cap
                fin_shift = float(off.shift[fin, k])
            t_on = start + (bgn + float(on.shift[bgn, k])) / fps
            t_off = start + (fin + fin_shift) / fps
            notes.append(Note(t_on, max(t_off, t_on), k + MIN_PITCH,
                              _velocity(float(velocity[bgn, k]))))
    return sort_notes(notes)


def _pedal_column(pedal_rolls: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    r = np.asarray(pedal_rolls[key], np.float32)
    if r.ndim == 2 and r.shape[1] == 1:
        r = r[:, 0]
    if r.ndim != 1:
        raise ValueError(f"{key} must be [T] or [T, 1], got {r.shape}")
    return r


@dataclass(frozen=True)
class Press:
    """One sustain press in frames: it begins at `bgn`, ends at `fin` + `shift` and the next
    may begin after `closed`; fin and closed are None for a press still down at the end."""

    bgn: int
    fin: int | None = None
    closed: int | None = None
    shift: float = 0.0


def pedal_presses(pedal_rolls: Mapping[str, np.ndarray], config: RollDecodeConfig | None = None,
                  after: int = 0) -> Iterator[Press]:
    """Kong's presses over pedal rolls {pedal_offset, pedal_frame: [T] or [T, 1]}, in order,
    the first beginning after frame `after`; the last one yielded may be still down (fin
    None), and then nothing follows. kong_pedals reads them all at once, a live stream a piece
    at a time (runtime/stream.py)."""
    cfg = config or RollDecodeConfig()
    frame = _pedal_column(pedal_rolls, "pedal_frame")
    offset = _pedal_column(pedal_rolls, "pedal_offset")
    if offset.shape != frame.shape:
        raise ValueError(f"pedal rolls differ in length: {offset.shape} vs {frame.shape}")
    t = frame.shape[0]
    thr = cfg.pedal_frame_threshold
    off = kong_peaks(offset, cfg.pedal_offset_threshold, OFFSET_NEIGHBOUR)
    rises = np.zeros(t, bool)
    rises[1:] = (frame[1:] >= thr) & (frame[1:] > frame[:-1])
    rise_frames = np.flatnonzero(rises).tolist()
    off_frames = np.flatnonzero(off.mask[:, 0]).tolist()
    below = frame <= thr
    drops = np.flatnonzero(_run_starts(below)).tolist()
    while (bgn := _first_after(rise_frames, after)) is not None:
        oo = _first_after(off_frames, bgn)
        fd = _first_below_after(below, drops, bgn)
        # Kong tests the offset peak before the 10-frame absence within a frame
        if oo is not None and (fd is None or oo <= fd + PEDAL_RELEASE_FRAMES):
            fin, closed = oo, oo
        elif fd is not None and fd + PEDAL_RELEASE_FRAMES <= t - 1:
            fin, closed = fd, fd + PEDAL_RELEASE_FRAMES
        else:
            yield Press(bgn)  # still down at the end of the rolls
            return
        yield Press(bgn, fin, closed, float(off.shift[fin, 0]))
        after = closed


def kong_pedals(pedal_rolls: Mapping[str, np.ndarray], frames_per_second: float,
                config: RollDecodeConfig | None = None, start: float = 0.0) -> list[Pedal]:
    """Pedal rolls {pedal_onset, pedal_offset, pedal_frame: [T] or [T, 1]} -> Kong's sustain
    presses (down, up) in seconds from `start`, in time order. pedal_onset is not read."""
    fps = float(frames_per_second)
    pedals: list[Pedal] = []
    for press in pedal_presses(pedal_rolls, config):
        if press.fin is None:
            break  # still down at the end of the rolls: Kong drops the press
        down = start + press.bgn / fps
        up = start + (press.fin + press.shift) / fps
        pedals.append((down, max(up, down)))
    return pedals


# ---- segmenting: Kong's enframe / deframe as index helpers, so a transcriber can stream ----


def kong_window_count(n_samples: int, segment_samples: int = KONG_SEGMENT_SAMPLES) -> int:
    """How many half-hop windows Kong's enframe cuts `n_samples` of audio into (the audio
    zero-padded to a multiple of the segment): 2 * segments - 1.

    Empty audio counts as one silent segment (one window): Kong's enframe fails on it, and
    runtime/audio.py's segmenters yield at least one segment, which kong_windows passes on.
    """
    if n_samples < 0 or segment_samples < 2:
        raise ValueError(f"bad sizes: n_samples={n_samples}, segment_samples={segment_samples}")
    padded = max(-(-int(n_samples) // segment_samples), 1) * segment_samples
    return (padded - segment_samples) // (segment_samples // 2) + 1


def kong_kept_frames(index: int, count: int, frames_per_window: int) -> slice:
    """The frames of window `index` (of `count`) that Kong's deframe keeps; concatenated in
    window order they give its timeline. `frames_per_window` = 10 * fps + 1."""
    if not 0 <= index < count:
        raise ValueError(f"window {index} out of 0..{count - 1}")
    if count == 1:
        return slice(0, frames_per_window)
    f = frames_per_window - 1  # the last frame (the next window's centre frame) is dropped
    if f % 4:
        raise ValueError(f"frames_per_window - 1 must be a multiple of 4, got {f}")
    lo = 0 if index == 0 else f // 4
    hi = f if index == count - 1 else 3 * f // 4
    return slice(lo, hi)


def kong_windows(segments: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Consecutive non-overlapping zero-padded segments (float32 [segment_samples]) -> Kong's
    half-hop windows, lazily: window 2j is segment j, window 2j+1 the second half of segment j
    then the first half of segment j+1. Holds one segment at a time."""
    prev: np.ndarray | None = None
    for seg in segments:
        seg = np.asarray(seg, np.float32)
        if seg.ndim != 1 or seg.shape[0] % 2 or (prev is not None and seg.shape != prev.shape):
            raise ValueError(f"segments must be 1-D, of one even length, got {seg.shape}")
        if prev is not None:
            half = seg.shape[0] // 2
            yield np.concatenate([prev[half:], seg[:half]])
        yield seg
        prev = seg
