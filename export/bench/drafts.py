"""Drafts that agree with a row's forced tokens at a chosen rate: the bench's speculative mode.

A random-weight model says nothing about how often a trained one agrees with its rolls, so the
bench sets the agreement: `AgreeingDraft.from_row(row, agreement, seed)` guesses each of the
row's notes exactly with probability `agreement`, independently per stage, and otherwise wrongly:
- onset stage: the note's time with another key (one not struck at that time), so the draft's
  time token is right and its pitch wrong, as a roll's neighbouring-key error would be;
- velocity stage: another velocity;
- offset stage: another off (note_sustain for a timed off, the segment's end for a sustain).
The decode loop verifies drafts against the forced logits (forcing.py), so whatever the
agreement the tokens are the codec's; only the number of decoder calls changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pianolm.runtime import vocab as V
from pianolm.runtime.backend import Backend
from pianolm.runtime.speculative import Draft

from .workload import Row


def onset_notes(tokens: Sequence[int]) -> list[tuple[int, int]]:
    """An onset sequence's (tick, pitch) notes."""
    return [(V.token_time(t), V.token_pitch(p)) for t, p in zip(tokens[::2], tokens[1::2])
            if V.is_time(t) and V.is_pitch(p)]


def offsets_by_note(tokens: Sequence[int]) -> dict[tuple[int, int], int]:
    """An offset-stage sequence (`on pitch off` per note) as (on tick, pitch) -> off token;
    a carried note's on tick is 0."""
    return {(0 if on == V.NOTE_SUSTAIN else V.token_time(on), V.token_pitch(p)): off
            for on, p, off in zip(tokens[0::3], tokens[1::3], tokens[2::3])}


def _wrong_pitch(tick: int, pitch: int, struck: set[tuple[int, int]],
                 rng: np.random.Generator) -> int:
    free = [p for p in range(V.MIN_PITCH, V.MAX_PITCH + 1) if (tick, p) not in struck]
    return int(rng.choice(free)) if free else pitch


def _wrong_off(off: int) -> int:
    return V.time_token(V.SEGMENT_TICKS) if off == V.NOTE_SUSTAIN else V.NOTE_SUSTAIN


@dataclass
class AgreeingDraft:
    """A Draft (runtime/speculative.py) given outright: notes, and each note's guesses."""

    onsets: list[tuple[int, int]]
    velocities: dict[tuple[int, int], int]  # (tick, pitch) -> velocity token
    offsets: dict[tuple[int, int], int]  # (on tick, 0 when carried; pitch) -> off token

    @classmethod
    def from_row(cls, row: Row, agreement: float, seed: int) -> AgreeingDraft:
        if not 0.0 <= agreement <= 1.0:
            raise ValueError(f"agreement {agreement}: must lie in [0, 1]")
        rng = np.random.default_rng(seed)
        notes = onset_notes(row.targets["onset"])
        struck = set(notes)
        onsets = [n if rng.random() < agreement else (n[0], _wrong_pitch(*n, struck, rng))
                  for n in notes]
        velocities = {n: v if rng.random() < agreement
                      else V.velocity_token((V.token_velocity(v) + 1 + int(rng.integers(126)))
                                            % V.NUM_VELOCITIES)
                      for n, v in zip(notes, row.targets["velocity"])}
        offsets = {n: off if rng.random() < agreement else _wrong_off(off)
                   for n, off in offsets_by_note(row.tokens["offset"][2:]).items()}
        return cls(sorted(set(onsets)), velocities, offsets)

    def velocity(self, tick: int, pitch: int) -> int:
        return self.velocities.get((tick, pitch), V.velocity_token(64))

    def offset(self, on_tick: int, pitch: int, limit_tick: int) -> int:
        return self.offsets.get((on_tick, pitch), V.NOTE_SUSTAIN)


@dataclass
class GivenDrafts:
    """A Drafter (runtime/decode.py) handing out drafts made beforehand, one per row."""

    drafts: list[Draft]

    def encode(self, backend: Backend, audio: np.ndarray) -> tuple[np.ndarray, list[Draft]]:
        if len(audio) != len(self.drafts):
            raise ValueError(f"{len(audio)} segments, {len(self.drafts)} drafts")
        return backend.encode(audio), self.drafts
