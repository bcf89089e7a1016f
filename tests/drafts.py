"""Drafts for the speculative tests: guesses given outright (runtime/speculative.py Draft)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pianolm.export.bench.drafts import offsets_by_note, onset_notes  # noqa: F401 (re-exported)
from pianolm.runtime import vocab as V


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
