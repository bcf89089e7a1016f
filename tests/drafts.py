"""Drafts for the speculative tests: guesses given outright (runtime/speculative.py Draft)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pianolm.runtime import vocab as V


def onset_notes(tokens: Sequence[int]) -> list[tuple[int, int]]:
    """An onset sequence's (tick, pitch) notes."""
    return [(V.token_time(t), V.token_pitch(p)) for t, p in zip(tokens[::2], tokens[1::2])
            if V.is_time(t) and V.is_pitch(p)]


def offsets_by_note(tokens: Sequence[int]) -> dict[tuple[int, int], int]:
    """An offset-stage sequence (`on pitch off` per note) as (on tick, pitch) -> off token;
    a carried note's on tick is 0."""
    return {(0 if on == V.NOTE_SUSTAIN else V.token_time(on), V.token_pitch(p)): off
            for on, p, off in zip(tokens[0::3], tokens[1::3], tokens[2::3])}


@dataclass
class GuessDraft:
    """onsets as given; velocity(tick, pitch) and offset(on_tick, pitch, limit) from callables
    (default: a constant guess)."""

    onsets: Sequence[tuple[int, int]] = ()
    guess_velocity: Callable[[int, int], int] = lambda tick, pitch: V.velocity_token(64)
    guess_offset: Callable[[int, int, int], int] = lambda on, pitch, limit: V.NOTE_SUSTAIN

    def velocity(self, tick: int, pitch: int) -> int:
        return self.guess_velocity(tick, pitch)

    def offset(self, on_tick: int, pitch: int, limit_tick: int) -> int:
        return self.guess_offset(on_tick, pitch, limit_tick)
