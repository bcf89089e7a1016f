"""Shared types and note-list helpers for the data pipeline.

A piece is a list of `Note`s (seconds, as played: offsets are key releases, never extended by
the pedal) plus the sustain-pedal intervals `(down, up)` in seconds, the same convention as
`pianolm.runtime.midi.read_midi_with_pedal`.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pianolm.runtime.notes import Note
from pianolm.runtime.vocab import MAX_PITCH, MIN_PITCH

Pedal = tuple[float, float]  # (down, up) in seconds


def cache_root() -> Path:
    """$PIANOLM_CACHE, default ~/.cache/pianolm: parsed scores, decoded samples."""
    return Path(os.environ.get("PIANOLM_CACHE") or Path.home() / ".cache" / "pianolm")

MIN_VELOCITY = 1
MAX_VELOCITY = 127


@dataclass
class Piece:
    """A performance to render: notes as played, pedal intervals, where it came from."""

    notes: list[Note]
    pedal: list[Pedal] = field(default_factory=list)
    name: str = ""
    source: str = ""  # "generated" or "corpus:<path inside the music21 corpus>"
    meta: dict = field(default_factory=dict)

    @property
    def end(self) -> float:
        """The last key release or pedal release (seconds)."""
        ends = [n.offset for n in self.notes] + [u for _, u in self.pedal]
        return max(ends, default=0.0)


def merge_pedal(pedal: Iterable[Pedal], min_length: float = 0.0) -> list[Pedal]:
    """Sort and merge overlapping pedal intervals; drop ones shorter than `min_length`."""
    out: list[list[float]] = []
    for down, up in sorted((float(d), float(u)) for d, u in pedal):
        if up - down <= min_length:
            continue
        if out and down <= out[-1][1]:
            out[-1][1] = max(out[-1][1], up)
        else:
            out.append([down, up])
    return [(d, u) for d, u in out]


def fold_pitch(pitch: int, low: int = MIN_PITCH, high: int = MAX_PITCH) -> int:
    """Move a pitch by octaves into [low, high]."""
    while pitch < low:
        pitch += 12
    while pitch > high:
        pitch -= 12
    return pitch


def tidy_notes(notes: Iterable[Note], min_duration: float = 0.03, gap: float = 0.004,
               low: int = MIN_PITCH, high: int = MAX_PITCH) -> list[Note]:
    """Make a note list playable on one piano and sorted by (onset, pitch).

    Pitches are folded by octaves into [low, high], velocities clipped to 1..127, negative
    times clipped to 0. Same-pitch notes never overlap: a key struck again while sounding is
    released `gap` seconds before the new strike; two strikes of a key closer than
    `min_duration` keep only the louder one. Notes shorter than `min_duration` are lengthened.
    """
    by_pitch: dict[int, list[Note]] = {}
    for n in notes:
        pitch = fold_pitch(int(n.pitch), low, high)
        vel = int(min(MAX_VELOCITY, max(MIN_VELOCITY, round(n.velocity))))
        on = max(0.0, float(n.onset))
        off = max(float(n.offset), on + min_duration)
        by_pitch.setdefault(pitch, []).append(Note(on, off, pitch, vel))
    out: list[Note] = []
    for pitch, items in by_pitch.items():
        items.sort()
        kept: list[Note] = []
        for n in items:
            if kept and n.onset - kept[-1].onset < min_duration:
                if n.velocity > kept[-1].velocity:
                    kept[-1] = Note(kept[-1].onset, max(kept[-1].offset, n.offset), pitch,
                                    n.velocity)
                continue
            if kept and kept[-1].offset > n.onset - gap:
                prev = kept[-1]
                kept[-1] = Note(prev.onset, max(prev.onset + min_duration / 2, n.onset - gap),
                                pitch, prev.velocity)
            kept.append(n)
        out.extend(kept)
    out.sort(key=lambda n: (n.onset, n.pitch))
    return out


def limit_density(notes: Sequence[Note], max_per_second: float) -> list[Note]:
    """Drop notes so that no 1 s window (ending at an onset) holds more than the limit."""
    kept: list[Note] = []
    onsets: list[float] = []
    limit = int(max_per_second)
    for n in sorted(notes, key=lambda n: (n.onset, n.pitch)):
        first = bisect.bisect_right(onsets, n.onset - 1.0)
        if len(onsets) - first >= limit:
            continue
        kept.append(n)
        onsets.append(n.onset)
    return kept


def max_density(notes: Sequence[Note], window: float = 1.0) -> int:
    """The largest number of onsets in any window of `window` seconds."""
    onsets = sorted(n.onset for n in notes)
    best = 0
    for i, t in enumerate(onsets):
        j = bisect.bisect_left(onsets, t + window)
        best = max(best, j - i)
    return best


def crop(piece: Piece, start: float, length: float) -> Piece:
    """The notes that start in [start, start + length), shifted so `start` becomes 0.

    Offsets are kept as played (they may run past `length`); pedal intervals that overlap the
    window are kept, shifted and clipped at 0.
    """
    end = start + length
    notes = [Note(n.onset - start, n.offset - start, n.pitch, n.velocity)
             for n in piece.notes if start <= n.onset < end]
    pedal = [(max(0.0, d - start), u - start) for d, u in piece.pedal if u > start and d < end]
    meta = dict(piece.meta, crop_start=round(start, 4))
    return Piece(notes, merge_pedal(pedal, 0.01), piece.name, piece.source, meta)


def pedal_down_at(pedal: Sequence[Pedal], t: float) -> Pedal | None:
    """The pedal interval holding time t (down <= t < up), if any; `pedal` must be merged."""
    i = bisect.bisect_right([d for d, _ in pedal], t) - 1
    if i >= 0 and t < pedal[i][1]:
        return pedal[i]
    return None
