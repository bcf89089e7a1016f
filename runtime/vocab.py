"""The token vocabulary (docs/tokens.md): one flat id space shared by all stages.

    0 pad, 1 sos, 2 eos, 3..6 task tokens, 7 note_sustain,
    time 0..1000 (10 ms steps inside a 10 s segment), pitch 21..108, velocity 0..127.
"""

from __future__ import annotations

import numpy as np

SEGMENT_SECONDS = 10.0
TICKS_PER_SECOND = 100  # the 10 ms grid
SEGMENT_TICKS = int(SEGMENT_SECONDS * TICKS_PER_SECOND)  # 1000
MIN_PITCH, MAX_PITCH = 21, 108
NUM_PITCHES = MAX_PITCH - MIN_PITCH + 1  # 88
NUM_VELOCITIES = 128

PAD, SOS, EOS = 0, 1, 2
TASK_ONSET, TASK_VELOCITY, TASK_OFFSET, TASK_FLAT = 3, 4, 5, 6
NOTE_SUSTAIN = 7
TIME_BASE = 8  # time tick t -> TIME_BASE + t, t in 0..SEGMENT_TICKS
PITCH_BASE = TIME_BASE + SEGMENT_TICKS + 1  # 1009
VELOCITY_BASE = PITCH_BASE + NUM_PITCHES  # 1097
VOCAB_SIZE = VELOCITY_BASE + NUM_VELOCITIES  # 1225

STAGES = ("onset", "velocity", "offset")
TASK_TOKEN = {"onset": TASK_ONSET, "velocity": TASK_VELOCITY, "offset": TASK_OFFSET,
              "flat": TASK_FLAT}


def time_token(tick: int) -> int:
    return TIME_BASE + tick


def pitch_token(pitch: int) -> int:
    return PITCH_BASE + pitch - MIN_PITCH


def velocity_token(velocity: int) -> int:
    return VELOCITY_BASE + velocity


def is_time(token: int) -> bool:
    return TIME_BASE <= token < PITCH_BASE


def is_pitch(token: int) -> bool:
    return PITCH_BASE <= token < VELOCITY_BASE


def is_velocity(token: int) -> bool:
    return VELOCITY_BASE <= token < VOCAB_SIZE


def token_time(token: int) -> int:
    return token - TIME_BASE


def token_pitch(token: int) -> int:
    return token - PITCH_BASE + MIN_PITCH


def token_velocity(token: int) -> int:
    return token - VELOCITY_BASE


def query_ticks(tokens: np.ndarray, mask: np.ndarray | None = None,
                start: np.ndarray | None = None) -> np.ndarray:
    """The tick each position's cross-attention query sits at in a time-aligned decoder
    (docs/decoder.md): the tick of the latest time token at or before it; 0 at a note_sustain
    (a note that began before the segment); where neither came yet, the row's tick before the
    chunk (`start` [B], default 0). One rule for every stage: the velocity and offset stages'
    `on pitch` chunks put a note's queries at its onset.

    tokens int64 [B, n] -> int64 [B, n]. mask [B, n]: False positions are padding and move
    nothing.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    batch, n = tokens.shape
    tick = np.where((tokens >= TIME_BASE) & (tokens < PITCH_BASE), tokens - TIME_BASE,
                    np.where(tokens == NOTE_SUSTAIN, 0, -1))
    if mask is not None:
        tick = np.where(mask, tick, -1)
    latest = np.maximum.accumulate(np.where(tick >= 0, np.arange(n), -1), axis=1)
    found = np.take_along_axis(tick, np.maximum(latest, 0), axis=1)
    before = np.zeros(batch, np.int64) if start is None else np.asarray(start, np.int64)
    return np.where(latest >= 0, found, before[:, None])


def describe(token: int) -> str:
    """Human-readable name of a token, for debugging and error messages."""
    names = {PAD: "pad", SOS: "sos", EOS: "eos", TASK_ONSET: "task=onset",
             TASK_VELOCITY: "task=velocity", TASK_OFFSET: "task=offset", TASK_FLAT: "task=flat",
             NOTE_SUSTAIN: "note_sustain"}
    if token in names:
        return names[token]
    if is_time(token):
        return f"time={token_time(token)}"
    if is_pitch(token):
        return f"pitch={token_pitch(token)}"
    if is_velocity(token):
        return f"velocity={token_velocity(token)}"
    return f"<invalid {token}>"


def as_dict() -> dict[str, int]:
    """The vocabulary layout, as written into an exported model's manifest."""
    return {"pad": PAD, "sos": SOS, "eos": EOS, "task_onset": TASK_ONSET,
            "task_velocity": TASK_VELOCITY, "task_offset": TASK_OFFSET, "task_flat": TASK_FLAT,
            "note_sustain": NOTE_SUSTAIN, "time_base": TIME_BASE, "segment_ticks": SEGMENT_TICKS,
            "pitch_base": PITCH_BASE, "min_pitch": MIN_PITCH, "max_pitch": MAX_PITCH,
            "velocity_base": VELOCITY_BASE, "vocab_size": VOCAB_SIZE}


TIME_TOKENS = np.arange(TIME_BASE, PITCH_BASE)
PITCH_TOKENS = np.arange(PITCH_BASE, VELOCITY_BASE)
VELOCITY_TOKENS = np.arange(VELOCITY_BASE, VOCAB_SIZE)
