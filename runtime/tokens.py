"""The token codec (docs/tokens.md): notes <-> per-segment token sequences for every stage.

Top to bottom: the tick grid (`TickNote`, `quantize`, `to_notes`), segmentation
(`SegmentNotes`, `segment_notes`), encoders (`encode_onset`, ..., `encode`), decoders that
never raise (`decode_onset`, ..., `decode`), stitching decoded segments back into one note list
(`SegmentResult`, `stitch`, `carried_into`). The sustain-pedal extension of offsets is
runtime/sustain.py's `extend_by_pedal`.

Standard library only: the runtime never imports torch.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from pianolm.runtime.notes import Note, sort_notes
from pianolm.runtime.vocab import (
    EOS,
    MAX_PITCH,
    MIN_PITCH,
    NOTE_SUSTAIN,
    NUM_VELOCITIES,
    PAD,
    SEGMENT_SECONDS,
    SEGMENT_TICKS,
    SOS,
    TASK_TOKEN,
    TICKS_PER_SECOND,
    is_pitch,
    is_time,
    is_velocity,
    pitch_token,
    time_token,
    token_pitch,
    token_time,
    token_velocity,
    velocity_token,
)

ALL_STAGES = ("onset", "velocity", "offset", "flat")
DEFAULT_VELOCITY = 64  # used by `SegmentResult.from_stages` when the velocity stage lacks a note

# Decoded per-segment structures. Ticks are relative to the segment start; `off` is None for
# note_sustain (the note sounds past the segment's end).
Onset = tuple[int, int]  # (tick, pitch)
Velocity = tuple[int, int, int]  # (tick, pitch, velocity)
OwnOffset = tuple[int, int, int | None]  # (tick, pitch, off)
CarriedOffset = tuple[int, int | None]  # (pitch, off)
OwnFlat = tuple[int, int, int | None, int]  # (tick, pitch, off, velocity)
CarriedFlat = tuple[int, int | None, int]  # (pitch, off, velocity)
OwnResult = tuple[int, int, int, int | None]  # (tick, pitch, velocity, off)
Decoded = (list[Onset] | list[Velocity] | tuple[list[OwnOffset], list[CarriedOffset]]
           | tuple[list[OwnFlat], list[CarriedFlat]])


# ---------------------------------------------------------------------------------------------
# The 10 ms grid


@dataclass(frozen=True)
class TickNote:
    """A note on the 10 ms grid: absolute ticks from the start of the file."""

    onset_tick: int
    offset_tick: int
    pitch: int
    velocity: int = DEFAULT_VELOCITY

    def __post_init__(self) -> None:
        if not 0 <= self.onset_tick < self.offset_tick:
            raise ValueError(f"need 0 <= onset_tick < offset_tick, got {self}")
        if not MIN_PITCH <= self.pitch <= MAX_PITCH:
            raise ValueError(f"pitch outside {MIN_PITCH}..{MAX_PITCH}: {self}")
        if not 0 <= self.velocity < NUM_VELOCITIES:
            raise ValueError(f"velocity outside 0..{NUM_VELOCITIES - 1}: {self}")

    @property
    def owner(self) -> int:
        """Index of the segment that owns this note (the one its onset lies in)."""
        return self.onset_tick // SEGMENT_TICKS

    @property
    def end_segment(self) -> int:
        """One past the last segment the note sounds in (its offset lies in end_segment - 1)."""
        return -(-self.offset_tick // SEGMENT_TICKS)


def _tick(seconds: float) -> int:
    return round(seconds * TICKS_PER_SECOND)


def _seconds(tick: int) -> float:
    return tick / TICKS_PER_SECOND


def _own_key(note: TickNote) -> tuple[int, int, int, int]:
    return (note.onset_tick, note.pitch, note.offset_tick, note.velocity)


def _carried_key(note: TickNote) -> tuple[int, int, int, int, int]:
    return (-note.owner, note.pitch, note.onset_tick, note.offset_tick, note.velocity)


def quantize(notes: Iterable[Note]) -> list[TickNote]:
    """Put notes on the grid: `tick = round(seconds * 100)`, offset at least onset + 1.

    Negative times are clamped to tick 0 and velocities to 0..127; notes with a pitch outside
    21..108 or a non-finite time cannot be tokenized and are dropped. Sorted by (onset, pitch).
    """
    out = []
    for note in notes:
        if not (MIN_PITCH <= note.pitch <= MAX_PITCH):
            continue
        if not (math.isfinite(note.onset) and math.isfinite(note.offset)):
            continue
        onset = max(_tick(note.onset), 0)
        offset = max(_tick(note.offset), onset + 1)
        velocity = min(max(int(note.velocity), 0), NUM_VELOCITIES - 1)
        out.append(TickNote(onset, offset, int(note.pitch), velocity))
    return sorted(out, key=_own_key)


def to_notes(ticknotes: Iterable[TickNote]) -> list[Note]:
    """Back to seconds (tick / 100), in the given order."""
    return [Note(_seconds(n.onset_tick), _seconds(n.offset_tick), n.pitch, n.velocity)
            for n in ticknotes]


# ---------------------------------------------------------------------------------------------
# Segments


@dataclass
class SegmentNotes:
    """The notes of segment `index`, in canonical order.

    `own`: onset inside the segment, sorted by (onset, pitch). `carried`: owned by an earlier
    segment and still sounding, sorted by (owning segment descending, pitch). Ties are broken by
    onset, offset, velocity.
    """

    index: int
    own: list[TickNote] = field(default_factory=list)
    carried: list[TickNote] = field(default_factory=list)

    @property
    def start(self) -> int:
        """First tick of the segment."""
        return self.index * SEGMENT_TICKS

    def check(self) -> None:
        """Raise ValueError unless own and carried notes belong here (encoders call this)."""
        for note in self.own:
            if note.owner != self.index:
                raise ValueError(f"own note {note} does not start in segment {self.index}")
        for note in self.carried:
            if not (note.owner < self.index and note.offset_tick > self.start):
                raise ValueError(f"carried note {note} is not carried into segment {self.index}")


def segment_notes(notes: Iterable[TickNote], n_segments: int | None = None) -> list[SegmentNotes]:
    """Split notes into segments of 1000 ticks (own and carried notes per segment).

    `n_segments` defaults to just enough segments to hold every onset and offset. With fewer,
    notes starting after the last segment are left out and notes sounding past it end with
    note_sustain there.
    """
    notes = list(notes)
    if n_segments is None:
        n_segments = max((n.end_segment for n in notes), default=0)
    if n_segments < 0:
        raise ValueError(f"n_segments must be >= 0, got {n_segments}")
    segments = [SegmentNotes(k) for k in range(n_segments)]
    for note in notes:
        if note.owner >= n_segments:
            continue
        segments[note.owner].own.append(note)
        for k in range(note.owner + 1, min(note.end_segment, n_segments)):
            segments[k].carried.append(note)
    for seg in segments:
        seg.own.sort(key=_own_key)
        seg.carried.sort(key=_carried_key)
    return segments


# ---------------------------------------------------------------------------------------------
# Encoders


def _off_token(note: TickNote, start: int) -> int:
    off = note.offset_tick - start
    return time_token(off) if off <= SEGMENT_TICKS else NOTE_SUSTAIN


def encode_onset(seg: SegmentNotes) -> list[int]:
    """`sos task_onset`, `time pitch` per own note, `eos`."""
    seg.check()
    tokens = [SOS, TASK_TOKEN["onset"]]
    for note in seg.own:
        tokens += [time_token(note.onset_tick - seg.start), pitch_token(note.pitch)]
    return tokens + [EOS]


def encode_velocity(seg: SegmentNotes) -> list[int]:
    """`sos task_velocity`, `time pitch velocity` per own note; no eos."""
    seg.check()
    tokens = [SOS, TASK_TOKEN["velocity"]]
    for note in seg.own:
        tokens += [time_token(note.onset_tick - seg.start), pitch_token(note.pitch),
                   velocity_token(note.velocity)]
    return tokens


def encode_offset(seg: SegmentNotes) -> list[int]:
    """`sos task_offset`, `time pitch off` per own note, `note_sustain pitch off` per carried
    note; no eos."""
    seg.check()
    tokens = [SOS, TASK_TOKEN["offset"]]
    for note in seg.own:
        tokens += [time_token(note.onset_tick - seg.start), pitch_token(note.pitch),
                   _off_token(note, seg.start)]
    for note in seg.carried:
        tokens += [NOTE_SUSTAIN, pitch_token(note.pitch), _off_token(note, seg.start)]
    return tokens


def encode_flat(seg: SegmentNotes) -> list[int]:
    """`sos task_flat`, `on pitch off velocity` per note (own, then carried), `eos`."""
    seg.check()
    tokens = [SOS, TASK_TOKEN["flat"]]
    for note in seg.own:
        tokens += [time_token(note.onset_tick - seg.start), pitch_token(note.pitch),
                   _off_token(note, seg.start), velocity_token(note.velocity)]
    for note in seg.carried:
        tokens += [NOTE_SUSTAIN, pitch_token(note.pitch), _off_token(note, seg.start),
                   velocity_token(note.velocity)]
    return tokens + [EOS]


_ENCODERS = {"onset": encode_onset, "velocity": encode_velocity, "offset": encode_offset,
             "flat": encode_flat}
# Which positions of a note group are predicted (docs/tokens.md, "predicted" column).
_GROUP_PREDICTED = {"onset": (True, True), "velocity": (False, False, True),
                    "offset": (False, False, True), "flat": (True, True, True, True)}


def encode(stage: str, seg: SegmentNotes) -> tuple[list[int], list[bool]]:
    """Tokens of `stage` for `seg`, and the loss mask: predicted[i] is True when token i is a
    training target (predicted from the tokens before it)."""
    if stage not in _ENCODERS:
        raise ValueError(f"unknown stage {stage!r}; expected one of {ALL_STAGES}")
    tokens = _ENCODERS[stage](seg)
    group = _GROUP_PREDICTED[stage]
    eos = stage in ("onset", "flat")
    n_groups = (len(tokens) - 2 - eos) // len(group)
    predicted = [False, False] + list(group) * n_groups + [True] * eos
    return tokens, predicted


# ---------------------------------------------------------------------------------------------
# Decoders (docs/tokens.md, "Decoding malformed sequences"): never raise


_ON_OFF = frozenset({"time", "sustain"})
_PATTERNS: dict[str, tuple[frozenset[str], ...]] = {
    "onset": (frozenset({"time"}), frozenset({"pitch"})),
    "velocity": (frozenset({"time"}), frozenset({"pitch"}), frozenset({"velocity"})),
    "offset": (_ON_OFF, frozenset({"pitch"}), _ON_OFF),
    "flat": (_ON_OFF, frozenset({"pitch"}), _ON_OFF, frozenset({"velocity"})),
}
_SKIPPED = frozenset({PAD, SOS, *TASK_TOKEN.values()})


def _kind(token: int) -> str:
    if token == EOS:
        return "eos"
    if token in _SKIPPED:
        return "skip"
    if token == NOTE_SUSTAIN:
        return "sustain"
    if is_time(token):
        return "time"
    if is_pitch(token):
        return "pitch"
    if is_velocity(token):
        return "velocity"
    return "invalid"


def _groups(tokens: Iterable[int], stage: str) -> list[tuple[int, ...]]:
    """Read tokens left to right and return every complete group of the stage's pattern.

    pad/sos/task tokens are skipped (transparent), eos ends the reading. A token that does not
    continue the current partial group abandons it; it starts a new group if it can, otherwise
    it is dropped.
    """
    pattern = _PATTERNS[stage]
    groups: list[tuple[int, ...]] = []
    current: list[int] = []
    for raw in tokens:
        try:
            token = int(raw)
        except (TypeError, ValueError, OverflowError):
            token = -1
        kind = _kind(token)
        if kind == "eos":
            break
        if kind == "skip":
            continue
        if kind in pattern[len(current)]:
            current.append(token)
        elif kind in pattern[0]:
            current = [token]
        else:
            current = []
        if len(current) == len(pattern):
            groups.append(tuple(current))
            current = []
    return groups


def _onset_tick(token: int) -> int | None:
    """Onset tick of an own note, None when impossible (time 1000 belongs to the next segment)."""
    tick = token_time(token)
    return tick if tick < SEGMENT_TICKS else None


def _off(token: int) -> int | None:
    return None if token == NOTE_SUSTAIN else token_time(token)


def _valid_off(on: int, off: int | None) -> bool:
    """Is `off` after the onset tick `on`? (A carried note sounds at the segment start, so it
    is checked with on = 0: its off cannot be time 0.)"""
    return off is None or off > on


def decode_onset(tokens: Iterable[int]) -> list[Onset]:
    """Onset stage -> [(tick, pitch)]."""
    out = []
    for t, p in _groups(tokens, "onset"):
        tick = _onset_tick(t)
        if tick is not None:
            out.append((tick, token_pitch(p)))
    return out


def decode_velocity(tokens: Iterable[int]) -> list[Velocity]:
    """Velocity stage -> [(tick, pitch, velocity)]."""
    out = []
    for t, p, v in _groups(tokens, "velocity"):
        tick = _onset_tick(t)
        if tick is not None:
            out.append((tick, token_pitch(p), token_velocity(v)))
    return out


def decode_offset(tokens: Iterable[int]) -> tuple[list[OwnOffset], list[CarriedOffset]]:
    """Offset stage -> (own [(tick, pitch, off)], carried [(pitch, off)]); off None = sustain."""
    own: list[OwnOffset] = []
    carried: list[CarriedOffset] = []
    for on, p, o in _groups(tokens, "offset"):
        pitch, off = token_pitch(p), _off(o)
        if on == NOTE_SUSTAIN:
            if _valid_off(0, off):
                carried.append((pitch, off))
            continue
        tick = _onset_tick(on)
        if tick is not None and _valid_off(tick, off):
            own.append((tick, pitch, off))
    return own, carried


def decode_flat(tokens: Iterable[int]) -> tuple[list[OwnFlat], list[CarriedFlat]]:
    """Flat baseline -> (own [(tick, pitch, off, velocity)], carried [(pitch, off, velocity)])."""
    own: list[OwnFlat] = []
    carried: list[CarriedFlat] = []
    for on, p, o, v in _groups(tokens, "flat"):
        pitch, off, velocity = token_pitch(p), _off(o), token_velocity(v)
        if on == NOTE_SUSTAIN:
            if _valid_off(0, off):
                carried.append((pitch, off, velocity))
            continue
        tick = _onset_tick(on)
        if tick is not None and _valid_off(tick, off):
            own.append((tick, pitch, off, velocity))
    return own, carried


_DECODERS = {"onset": decode_onset, "velocity": decode_velocity, "offset": decode_offset,
             "flat": decode_flat}


def decode(stage: str, tokens: Iterable[int]) -> Decoded:
    """Dispatch to the stage's decoder (raises ValueError only for an unknown stage name)."""
    if stage not in _DECODERS:
        raise ValueError(f"unknown stage {stage!r}; expected one of {ALL_STAGES}")
    return _DECODERS[stage](tokens)


# ---------------------------------------------------------------------------------------------
# Stitching segments back into one note list


@dataclass
class SegmentResult:
    """What one segment decoded to: ticks relative to the segment start, off None = sustain.

    own: [(tick, pitch, velocity, off)] in decoding order; carried: [(pitch, off)].
    """

    own: list[OwnResult] = field(default_factory=list)
    carried: list[CarriedOffset] = field(default_factory=list)

    @classmethod
    def from_stages(cls, onsets: Sequence[Onset], velocities: Sequence[Velocity],
                    offsets: tuple[Sequence[OwnOffset], Sequence[CarriedOffset]]
                    ) -> SegmentResult:
        """Combine the three stages' decodings by position: note i takes its tick and pitch
        from onsets[i], its velocity from velocities[i] (64 if missing) and its off from the
        offset stage's own[i] (note_sustain if missing)."""
        own_offsets, carried = offsets
        own = []
        for i, (tick, pitch) in enumerate(onsets):
            velocity = velocities[i][2] if i < len(velocities) else DEFAULT_VELOCITY
            off = own_offsets[i][2] if i < len(own_offsets) else None
            own.append((tick, pitch, velocity, off))
        return cls(own, list(carried))

    @classmethod
    def from_flat(cls, flat: tuple[Sequence[OwnFlat], Sequence[CarriedFlat]]) -> SegmentResult:
        """From the flat baseline's decoding (carried notes' velocities are not needed)."""
        own, carried = flat
        return cls([(t, p, v, off) for t, p, off, v in own], [(p, off) for p, off, _ in carried])


@dataclass
class _Open:
    """A stitched note whose offset is not known yet."""

    onset: int
    pitch: int
    velocity: int
    owner: int

    def close(self, offset_tick: int) -> Note:
        offset_tick = max(offset_tick, self.onset + 1)
        return Note(_seconds(self.onset), _seconds(offset_tick), self.pitch, self.velocity)


def _carried_order(note: _Open) -> tuple[int, int, int]:
    return (-note.owner, note.pitch, note.onset)


class Stitcher:
    """Segments' results joined into one note list as they arrive (segment k from tick 1000 k):
    the notes closed so far and the ones still open, so a long file's decoded segments need
    not be kept until it ends. stitch() and stitch_tail() are this over a whole list.

    A note whose off is note_sustain stays open; the next segment's carried block closes or
    keeps it, matched by pitch against the open notes taken in carried order (owning segment
    descending, pitch, onset). An open note missing from the next carried block ends at that
    segment's start. Offsets never precede onset + 1 tick.
    """

    def __init__(self) -> None:
        self.notes: list[Note] = []  # closed
        self.open: list[_Open] = []
        self.segments = 0  # pushed so far

    @classmethod
    def over(cls, segments: Sequence[SegmentResult]) -> Stitcher:
        """A Stitcher that has pushed `segments`, in order."""
        stitcher = cls()
        for seg in segments:
            stitcher.push(seg)
        return stitcher

    def push(self, seg: SegmentResult) -> None:
        k = self.segments
        start = k * SEGMENT_TICKS
        candidates = sorted(self.open, key=_carried_order)
        self.open = []
        for pitch, off in seg.carried:
            match = next((n for n in candidates if n.pitch == pitch), None)
            if match is None:
                continue
            candidates.remove(match)
            if off is None:
                self.open.append(match)
            else:
                self.notes.append(match.close(start + off))
        self.notes += [n.close(start) for n in candidates]  # not carried on: ended at the boundary
        for tick, pitch, velocity, off in seg.own:
            note = _Open(start + tick, pitch, velocity, k)
            if off is None:
                self.open.append(note)
            else:
                self.notes.append(note.close(start + off))
        self.segments += 1

    def carried(self) -> list[int]:
        """Pitches of the next segment's carried block, in carried order: the `note_sustain
        pitch` prompts its offset stage is fed (the notes left open)."""
        return [n.pitch for n in sorted(self.open, key=_carried_order)]

    def finish(self, end: float | None = None) -> list[Note]:
        """All notes, sorted by (onset, pitch); notes still open end at `end` (seconds;
        default: the end of the last segment)."""
        end_seconds = self.segments * SEGMENT_SECONDS if end is None else end
        for n in self.open:  # still sounding after the last segment: ends with the audio
            self.notes.append(Note(_seconds(n.onset), max(end_seconds, _seconds(n.onset + 1)),
                                   n.pitch, n.velocity))
        self.open = []
        return sort_notes(self.notes)

    def finish_tail(self, tail: SegmentResult, tail_start: float, end: float) -> list[Note]:
        """finish() for a file whose last segment was end-aligned (runtime/audio.py
        tail_start): `tail` was decoded on its own from `tail_start` seconds, overlapping the
        last pushed segment up to the boundary (its end). Each note is taken from one side only:
        before the boundary from the pushed segments, from the boundary on from `tail`. A note
        still sounding at the boundary ends where the tail's note of the same key that sounds
        across the boundary ends (nearest onset first); when the tail has none, at the
        boundary, as push() ends a note the next segment does not carry."""
        boundary = self.segments * SEGMENT_SECONDS
        tail_notes = [replace(n, onset=n.onset + tail_start, offset=n.offset + tail_start)
                      for n in stitch([tail], end - tail_start)]
        across = [n for n in tail_notes if n.onset < boundary < n.offset]
        for note in sorted(self.open, key=lambda o: o.onset):
            onset = _seconds(note.onset)
            same_key = [n for n in across if n.pitch == note.pitch]
            match = min(same_key, key=lambda n: abs(n.onset - onset), default=None)
            if match is not None:
                across.remove(match)
            offset = max(match.offset if match else boundary, _seconds(note.onset + 1))
            self.notes.append(Note(onset, offset, note.pitch, note.velocity))
        self.open = []
        self.notes += [n for n in tail_notes if n.onset >= boundary]
        return sort_notes(self.notes)


def clip_to(notes: list[Note], end: float) -> list[Note]:
    """Sorted `notes` made to lie within audio `end` seconds long, in place: onsets from `end`
    on dropped, offsets cut at it."""
    del notes[bisect_left(notes, end, key=lambda n: n.onset):]
    for i, n in enumerate(notes):
        if n.offset > end:
            notes[i] = replace(n, offset=end)
    return notes


def stitch(segments: Sequence[SegmentResult], end: float | None = None) -> list[Note]:
    """Join consecutive segments' results into one note list (Stitcher, all at once)."""
    stitcher = Stitcher.over(segments)
    return stitcher.finish(end)


def stitch_tail(segments: Sequence[SegmentResult], tail: SegmentResult, tail_start: float,
                end: float) -> list[Note]:
    """stitch() for a file whose last segment was end-aligned (Stitcher.finish_tail)."""
    stitcher = Stitcher.over(segments)
    return stitcher.finish_tail(tail, tail_start, end)


def carried_into(segments: Sequence[SegmentResult]) -> list[int]:
    """Stitcher.carried() after `segments`."""
    stitcher = Stitcher.over(segments)
    return stitcher.carried()
