"""RollStream (runtime/rolls.py): peak picking a piece at a time gives exactly decode_rolls'
notes on the whole timeline, whatever the pieces, so the rolls decoder can keep flat memory."""

from __future__ import annotations

import numpy as np
import pytest

from pianolm.runtime.rolls import ROLL_KEYS, RollDecodeConfig, RollStream, decode_rolls


def _rolls(rng: np.random.Generator, frames: int) -> dict[str, np.ndarray]:
    """Roll-like noise: sparse onset/offset bumps, frame rolls that stay on for a while
    (long notes cross piece boundaries), plateaus (ties) from rounding."""
    onset = np.round(rng.random((frames, 88)) ** 6, 1).astype(np.float32)
    offset = np.round(rng.random((frames, 88)) ** 6, 1).astype(np.float32)
    on = rng.random((frames, 88)) < 0.02
    frame = np.zeros((frames, 88), np.float32)
    level = np.zeros(88, np.float32)
    for t in range(frames):
        level = np.where(on[t], 1.0, level * rng.uniform(0.9, 1.0, 88)).astype(np.float32)
        frame[t] = level
    velocity = rng.random((frames, 88)).astype(np.float32)
    return {"onset": onset, "offset": offset, "frame": frame, "velocity": velocity}


CONFIGS = [
    RollDecodeConfig(),
    RollDecodeConfig(onset_threshold=0.5, frame_threshold=0.3, velocity_curve=(0.006, 0.2, 20)),
    RollDecodeConfig(peak_radius=1, subframe=False),
    RollDecodeConfig(peak_radius=4, max_note_seconds=0.3),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_stream_equals_whole_timeline(config: RollDecodeConfig, seed: int) -> None:
    rng = np.random.default_rng(seed)
    frames = 1301
    rolls = _rolls(rng, frames)
    whole = decode_rolls(rolls, 50, config, start=1.5)
    assert len(whole) > 50  # the timeline has notes to get wrong
    for cuts in ([500, 1000], sorted(rng.choice(np.arange(1, frames), 40, replace=False)),
                 list(range(1, frames))):
        stream = RollStream(50, config, start=1.5)
        for a, b in zip([0, *cuts], [*cuts, frames]):
            stream.push({k: rolls[k][a:b] for k in ROLL_KEYS})
        assert stream.finish() == whole, f"cuts {cuts[:5]}..."


def test_stream_of_one_frame_and_of_nothing() -> None:
    rolls = _rolls(np.random.default_rng(3), 1)
    stream = RollStream(50)
    stream.push(rolls)
    assert stream.finish() == decode_rolls(rolls, 50)
    assert RollStream(50).finish() == []


def test_stream_keeps_only_a_few_frames() -> None:
    rolls = _rolls(np.random.default_rng(4), 3000)
    stream = RollStream(50)
    for a in range(0, 3000, 500):
        stream.push({k: rolls[k][a:a + 500] for k in ROLL_KEYS})
        assert stream._buf["onset"].shape[0] <= 500 + 2 * stream.radius + 1
    stream.finish()
