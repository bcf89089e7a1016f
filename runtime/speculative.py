"""Drafts for speculative decoding: a guess of every stage's tokens, from the encoder's rolls.

The decode loop (runtime/decode.py) verifies a draft instead of stepping token by token: one
call feeds the draft's next tokens and gives the logits after every position
(StageSession.step_all, manifest format 6); a row keeps the draft while the grammar-constrained
argmax agrees with it, plus the argmax at the first disagreement, and the rest is retracted
(StageSession.retract). What a row keeps is what greedy decoding would have chosen, so a draft
changes how many calls a segment costs, never its tokens.

A draft (`Draft`) says, for one segment:
- onset stage: its (tick, pitch) notes, sorted; `continuation` turns them into the tokens that
  continue a row's grammar state;
- velocity stage: a velocity token for a known (tick, pitch);
- offset stage: an `off` token for a known note (onset tick, pitch, the key's next onset);
- the flattened baseline: all three at once (`FlatDraft`: `on pitch off velocity` per note).
`RollDraft` reads all three from the segment's rolls (runtime/rolls.py decode_rolls, with the
manifest's thresholds). The velocity and offset loops then refine their own guesses (Jacobi):
a guess that failed is replaced by the LM's prediction at that position.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from . import vocab as V
from .grammar import OnsetGrammar, next_onset_of_same_key
from .rolls import RollDecodeConfig, decode_rolls

ONSET_DRAFT = 16  # most draft tokens one onset-stage call verifies
NOTE_DRAFT = 8  # most notes one velocity- or offset-stage call verifies (3 tokens each)
NEAR_TICKS = 2  # a draft note this close to a pending time stands for it (10 ms per tick)
MATCH_TICKS = 5  # a roll note this close to a known onset is the same note (the 50 ms rule)
TICKS_PER_SECOND = V.SEGMENT_TICKS / V.SEGMENT_SECONDS


@dataclass
class SpeculativeStats:
    """What one stage's decoding cost: decoder calls, tokens emitted, draft tokens fed and
    accepted (all zero but calls and tokens when nothing was drafted)."""

    calls: int = 0
    tokens: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_call(self) -> float:
        return self.tokens / self.calls if self.calls else 0.0

    def add(self, other: SpeculativeStats) -> None:
        self.calls += other.calls
        self.tokens += other.tokens
        self.drafted += other.drafted
        self.accepted += other.accepted


class Draft(Protocol):
    """One segment's guesses of every stage's tokens."""

    onsets: Sequence[tuple[int, int]]  # (tick, pitch), sorted

    def velocity(self, tick: int, pitch: int) -> int:
        """A velocity token for the note struck at `tick` on key `pitch`."""
        ...

    def offset(self, on_tick: int, pitch: int, limit_tick: int) -> int:
        """An `off` token (a time, or note_sustain) for the note: onset tick (0 for a carried
        note), key, the key's next onset in the segment or -1 (grammar.offset_mask)."""
        ...


def continuation(draft: Sequence[tuple[int, int]], grammar: OnsetGrammar, row: int,
                 k: int) -> list[int]:
    """Up to k draft tokens that continue `row`'s state: the draft's notes (tick, pitch; sorted)
    after the row's latest note, as `time pitch` tokens, then eos. After a time token the
    draft's note at that time comes first (or, none there, its nearest within NEAR_TICKS)."""
    pending, last_tick = int(grammar.pending_tick[row]), int(grammar.last_tick[row])
    last_pitch = int(grammar.last_pitch[row])
    tokens: list[int] = []
    if pending >= 0:
        floor = last_pitch if last_tick == pending else -1
        near = [n for n in draft[bisect_left(draft, (pending - NEAR_TICKS, -1)):
                                 bisect_right(draft, (pending + NEAR_TICKS, V.MAX_PITCH))]
                if n[0] != pending or n[1] > floor]
        if not near:
            return []
        # the draft's next note at that time, else the nearest in time
        used = min(near, key=lambda n: (abs(n[0] - pending), n[0] != pending, n[1]))
        tokens.append(V.pitch_token(used[1]))
        rest = [n for n in draft[bisect_right(draft, (pending, used[1])):] if n != used]
    else:
        rest = list(draft[bisect_right(draft, (last_tick, last_pitch)):])
    for tick, pitch in rest:
        if len(tokens) >= k:
            return tokens[:k]
        tokens += [V.time_token(tick), V.pitch_token(pitch)]
    return (tokens + [V.EOS])[:k]


@dataclass
class FlatDraft:
    """A Draft in the flattened baseline's grammar: `on pitch off velocity` per note, own
    notes by (time, pitch), then the carried ones in carried-block order."""

    groups: list[tuple[int, int, int, int]]
    carried_rank: dict[int, int]  # pitch -> place among the carried notes
    keys: list[tuple[int, int, int]] = field(init=False)  # each group's place in that order

    def __post_init__(self) -> None:
        self.keys = [self.key(on, pitch) for on, pitch, _, _ in self.groups]

    @classmethod
    def from_draft(cls, draft: Draft, carried: Sequence[int]) -> FlatDraft:
        """`draft`'s notes and guesses; `carried`: the pitches carried in, in block order."""
        notes = list(draft.onsets)
        first_onset = {p: t for t, p in reversed(notes)}
        groups = [(V.time_token(t), V.pitch_token(p), draft.offset(t, p, limit),
                   draft.velocity(t, p))
                  for (t, p), limit in zip(notes, next_onset_of_same_key(notes))]
        # a carried key the draft strikes again at tick 0 ends there: no note (decode.py's
        # _carried_entries)
        carried = [p for p in carried if first_onset.get(p) != 0]
        groups += [(V.NOTE_SUSTAIN, V.pitch_token(p), draft.offset(0, p, first_onset.get(p, -1)),
                    draft.velocity(0, p)) for p in carried]
        return cls(groups, {p: i for i, p in enumerate(carried)})

    def key(self, on: int, pitch: int) -> tuple[int, int, int]:
        if on == V.NOTE_SUSTAIN:
            return (1, self.carried_rank.get(V.token_pitch(pitch), len(self.carried_rank)), 0)
        return (0, V.token_time(on), V.token_pitch(pitch))

    def _current(self, partial: Sequence[int], start: int) -> int | None:
        """The draft note standing for a row's unfinished note (its `on`, maybe its pitch):
        one from `start` on with that pitch and that on (a time within NEAR_TICKS; the
        nearest, then the first)."""
        on = partial[0]

        def fits(j: int) -> bool:
            g_on, g_pitch = self.groups[j][:2]
            if len(partial) > 1 and g_pitch != partial[1]:
                return False
            if on == V.NOTE_SUSTAIN or not V.is_time(g_on):
                return g_on == on
            return abs(V.token_time(g_on) - V.token_time(on)) <= NEAR_TICKS

        near = [j for j in range(start, len(self.groups)) if fits(j)]
        if on == V.NOTE_SUSTAIN:
            return near[0] if near else None
        return min(near, key=lambda j: abs(V.token_time(self.groups[j][0]) - V.token_time(on)),
                   default=None)

    def continuation(self, out: Sequence[int], k: int) -> list[int]:
        """Up to k draft tokens that continue a row's flat tokens `out`: the rest of its
        unfinished note, then the draft's notes after it, then eos."""
        whole = len(out) - len(out) % 4
        start = bisect_right(self.keys, self.key(out[whole - 4], out[whole - 3])) if whole else 0
        tokens: list[int] = []
        if whole < len(out):
            current = self._current(out[whole:], start)
            if current is None:
                return []
            tokens, start = list(self.groups[current][len(out) - whole:]), current + 1
        for group in self.groups[start:]:
            if len(tokens) >= k:
                return tokens[:k]
            tokens += group
        return (tokens + [V.EOS])[:k]


def _tick(seconds: float) -> int:
    return int(round(seconds * TICKS_PER_SECOND))


def as_the_prior_reads(config: RollDecodeConfig) -> RollDecodeConfig:
    """The rolls read as stages with a roll prior read them at initialisation
    (export/roll_prior.py, calibrated from these thresholds): peaks over +-1 frame, whole-frame
    ticks (the prior prefers a frame's first tick). Drafts read so speak the stages' own rule,
    and a verify accepts what the stages agree with."""
    return replace(config, method="pianolm", peak_radius=1, subframe=False)


@dataclass
class RollDraft:
    """A Draft read from one segment's rolls {onset, offset, frame, velocity: [T, 88]}."""

    onsets: list[tuple[int, int]]
    by_key: dict[int, list[tuple[int, int, int]]]  # pitch -> (on tick, off tick, velocity)
    sounding: np.ndarray  # bool [T, 88]: the frame roll above its threshold
    frames_per_second: float
    default_velocity: int = 64  # for a note the rolls missed: their median

    @classmethod
    def from_rolls(cls, rolls: Mapping[str, np.ndarray], frames_per_second: float,
                   config: RollDecodeConfig) -> RollDraft:
        notes = decode_rolls(rolls, frames_per_second, config)
        by_key: dict[int, list[tuple[int, int, int]]] = {}
        onsets = set()
        for n in notes:
            on = min(max(_tick(n.onset), 0), V.SEGMENT_TICKS - 1)
            by_key.setdefault(n.pitch, []).append((on, _tick(n.offset), n.velocity))
            onsets.add((on, n.pitch))
        velocities = [n.velocity for n in notes]
        return cls(sorted(onsets), by_key,
                   np.asarray(rolls["frame"]) > config.frame_threshold, frames_per_second,
                   int(np.median(velocities)) if velocities else 64)

    def _match(self, tick: int, pitch: int) -> tuple[int, int, int] | None:
        near = [n for n in self.by_key.get(pitch, ()) if abs(n[0] - tick) <= MATCH_TICKS]
        return min(near, key=lambda n: abs(n[0] - tick)) if near else None

    def velocity(self, tick: int, pitch: int) -> int:
        note = self._match(tick, pitch)
        return V.velocity_token(note[2] if note else self.default_velocity)

    def offset(self, on_tick: int, pitch: int, limit_tick: int) -> int:
        note = self._match(on_tick, pitch) if on_tick > 0 else None
        if note is not None:
            off = note[1]
        else:  # a carried note, or one the rolls missed: until the frame roll lets go
            first = int(on_tick * self.frames_per_second / TICKS_PER_SECOND) + 1
            quiet = np.flatnonzero(~self.sounding[first:, pitch - V.MIN_PITCH])
            off = (_tick((first + quiet[0]) / self.frames_per_second) if len(quiet)
                   else V.SEGMENT_TICKS)
        if limit_tick < 0 and off >= V.SEGMENT_TICKS:
            return V.NOTE_SUSTAIN
        hi = limit_tick if limit_tick >= 0 else V.SEGMENT_TICKS
        return V.time_token(min(max(off, on_tick + 1), hi))
