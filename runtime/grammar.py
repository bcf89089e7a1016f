"""Which tokens may come next: the grammar that keeps every decoded sequence parseable.

Masks are boolean arrays [B, vocab]; the decode loop sets disallowed logits to -inf before argmax.
- onset stage: after a pitch (or at the start) a time >= the previous time, or eos; after a time,
  a pitch, strictly above the previous pitch when the time is unchanged (no duplicate notes),
  and not a key struck less than REPEAT_TICKS ago (a key cannot start again within 50 ms,
  as Whisper's timestamp rules forbid impossible timings); a time is allowed only if some
  pitch may follow it. Onset times lie in 0..999 (tick 1000 is the segment's end).
- velocity stage: a velocity token.
- offset stage: a time after the onset and no later than the next onset of the same key in the
  segment (a key cannot sound twice), or note_sustain when no later onset of that key exists.
"""

from __future__ import annotations

import numpy as np

from . import vocab as V

_TICKS = np.arange(V.SEGMENT_TICKS + 1)  # 0..1000
_PITCHES = np.arange(V.MIN_PITCH, V.MAX_PITCH + 1)
_LAST_ONSET_TICK = V.SEGMENT_TICKS - 1
# The shortest gap between two onsets of one key (docs/tokens.md): 5 ticks = 50 ms, the onset
# tolerance, below which a second onset can only be a duplicate of the first.
REPEAT_TICKS = 5
_NEVER = -(10**6)  # "last onset" of a key not struck in this segment


class OnsetGrammar:
    """Tracks each row of a batch through the onset stage and says what may come next."""

    def __init__(self, batch: int, max_notes: int):
        self.max_notes = max_notes
        self.last_tick = np.full(batch, -1)  # tick of the latest note; -1 before the first
        self.last_pitch = np.full(batch, V.MIN_PITCH - 1)
        self.pending_tick = np.full(batch, -1)  # a time was emitted, its pitch is due
        self.n_notes = np.zeros(batch, dtype=np.int64)
        self.key_tick = np.full((batch, V.NUM_PITCHES), _NEVER)  # each key's latest onset
        self.done = np.zeros(batch, dtype=bool)

    def mask(self) -> np.ndarray:
        batch = len(self.done)
        allowed = np.zeros((batch, V.VOCAB_SIZE), dtype=bool)
        want_pitch = self.pending_tick >= 0
        # Time (or eos) next: times never go back; no time at all once the note limit is
        # reached; a time needs a key that may start then: the same time again a free key
        # above the previous pitch, a later time any key struck REPEAT_TICKS before it.
        room = (self.n_notes < self.max_notes)[:, None]
        above = _PITCHES[None, :] > self.last_pitch[:, None]
        free_above = np.where(above, self.key_tick, -_NEVER).min(axis=1)
        same = ((_TICKS[None, :] == self.last_tick[:, None])
                & (free_above <= self.last_tick - REPEAT_TICKS)[:, None])
        later = ((_TICKS[None, :] > self.last_tick[:, None])
                 & (_TICKS[None, :] >= self.key_tick.min(axis=1)[:, None] + REPEAT_TICKS))
        time_ok = room & (later | same) & (_TICKS <= _LAST_ONSET_TICK)[None, :]
        rows = ~want_pitch & ~self.done
        allowed[:, V.TIME_BASE:V.PITCH_BASE] = time_ok & rows[:, None]
        allowed[:, V.EOS] = rows
        # Pitch next: above the previous pitch when the time did not move; a free key.
        floor = np.where(self.pending_tick == self.last_tick, self.last_pitch, V.MIN_PITCH - 1)
        pitch_ok = ((_PITCHES[None, :] > floor[:, None])
                    & (self.key_tick <= self.pending_tick[:, None] - REPEAT_TICKS))
        allowed[:, V.PITCH_BASE:V.VELOCITY_BASE] = pitch_ok & (want_pitch & ~self.done)[:, None]
        # A finished row is fed padding; keep argmax well defined.
        allowed[self.done, V.PAD] = True
        return allowed

    def update(self, tokens: np.ndarray) -> None:
        """Advance every unfinished row by its chosen token (PAD: none, it stays)."""
        live = ~self.done
        is_eos = live & (tokens == V.EOS)
        is_time = live & (tokens >= V.TIME_BASE) & (tokens < V.PITCH_BASE)
        is_pitch = live & (tokens >= V.PITCH_BASE) & (tokens < V.VELOCITY_BASE)
        self.done |= is_eos
        self.pending_tick = np.where(is_time, tokens - V.TIME_BASE, self.pending_tick)
        pitch = tokens - V.PITCH_BASE + V.MIN_PITCH
        self.last_tick = np.where(is_pitch, self.pending_tick, self.last_tick)
        self.last_pitch = np.where(is_pitch, pitch, self.last_pitch)
        rows = np.flatnonzero(is_pitch)
        self.key_tick[rows, pitch[rows] - V.MIN_PITCH] = self.pending_tick[rows]
        self.n_notes += is_pitch
        self.pending_tick = np.where(is_pitch, -1, self.pending_tick)


def next_onset_of_same_key(notes: list[tuple[int, int]]) -> list[int]:
    """For each (tick, pitch) note, the tick of the next note of the same key in the segment,
    or -1: where its off must come by (offset_mask's limit_tick)."""
    limit, seen = [-1] * len(notes), {}
    for i in range(len(notes) - 1, -1, -1):
        tick, pitch = notes[i]
        limit[i] = seen.get(pitch, -1)
        seen[pitch] = tick
    return limit


def velocity_mask(batch: int) -> np.ndarray:
    allowed = np.zeros((batch, V.VOCAB_SIZE), dtype=bool)
    allowed[:, V.VELOCITY_BASE:] = True
    return allowed


def offset_mask(on_tick: np.ndarray, limit_tick: np.ndarray) -> np.ndarray:
    """Allowed `off` tokens per row.

    on_tick:    onset tick of the note in the segment; 0 for a carried note (it ends at tick 1 or
                later: ending at tick 0 is the previous segment's tick 1000).
    limit_tick: the next onset tick of the same key in the segment, or -1 if there is none
                (then the note may also sustain past the segment's end).
    """
    allowed = np.zeros((len(on_tick), V.VOCAB_SIZE), dtype=bool)
    hi = np.where(limit_tick >= 0, limit_tick, V.SEGMENT_TICKS)
    ok = (_TICKS[None, :] > on_tick[:, None]) & (_TICKS[None, :] <= hi[:, None])
    allowed[:, V.TIME_BASE:V.PITCH_BASE] = ok
    allowed[:, V.NOTE_SUSTAIN] = limit_tick < 0
    # Never empty: a later onset of the key lies after on_tick (onsets of a key never repeat a
    # tick), and the loop does not feed a carried note whose key is struck again at tick 0.
    return allowed


class FlatGrammar:
    """The flattened baseline: `on pitch off velocity` per note, own notes (on = a time, never
    going back) before carried ones (on = note_sustain), then eos."""

    ON, PITCH, OFF, VELOCITY = range(4)

    def __init__(self, batch: int, max_notes: int):
        self.max_notes = max_notes
        self.field = np.full(batch, self.ON)
        self.last_on = np.full(batch, -1)  # latest onset tick; -2 once carried notes began
        self.on = np.full(batch, -1)  # the current note's onset tick (0 for a carried note)
        self.n_notes = np.zeros(batch, dtype=np.int64)
        self.done = np.zeros(batch, dtype=bool)

    def mask(self) -> np.ndarray:
        batch = len(self.done)
        allowed = np.zeros((batch, V.VOCAB_SIZE), dtype=bool)
        live = ~self.done
        at = {f: live & (self.field == f) for f in range(4)}
        room = self.n_notes < self.max_notes
        own_open = at[self.ON] & room & (self.last_on > -2)
        times = (_TICKS[None, :] >= self.last_on[:, None]) & (_TICKS <= _LAST_ONSET_TICK)[None, :]
        allowed[:, V.TIME_BASE:V.PITCH_BASE] |= times & own_open[:, None]
        allowed[:, V.NOTE_SUSTAIN] |= at[self.ON] & room
        allowed[:, V.EOS] |= at[self.ON]
        allowed[:, V.PITCH_BASE:V.VELOCITY_BASE] |= at[self.PITCH][:, None]
        allowed[:, V.TIME_BASE:V.PITCH_BASE] |= (_TICKS[None, :] > self.on[:, None]) & at[
            self.OFF][:, None]
        allowed[:, V.NOTE_SUSTAIN] |= at[self.OFF]
        allowed[:, V.VELOCITY_BASE:] |= at[self.VELOCITY][:, None]
        allowed[self.done, V.PAD] = True
        return allowed

    def update(self, tokens: np.ndarray) -> None:
        """Advance every unfinished row by its token; a row given PAD stays where it is (a
        speculative call's row that kept no more of its draft)."""
        live = ~self.done & (tokens != V.PAD)
        at_on = live & (self.field == self.ON)
        self.done |= at_on & (tokens == V.EOS)
        live &= ~self.done
        sustain_on = at_on & live & (tokens == V.NOTE_SUSTAIN)
        time_on = at_on & live & (tokens >= V.TIME_BASE) & (tokens < V.PITCH_BASE)
        # A carried note's off is tick 1 or later, as in the offset stage.
        self.on = np.where(time_on, tokens - V.TIME_BASE, np.where(sustain_on, 0, self.on))
        self.last_on = np.where(time_on, self.on, np.where(sustain_on, -2, self.last_on))
        self.n_notes += live & (self.field == self.VELOCITY)
        self.field = np.where(live, (self.field + 1) % 4, self.field)
