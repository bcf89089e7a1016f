"""Test audio: struck, decaying harmonic tones at random pitches, one every half second;
piano enough for the shipped model to find notes where a test compares two paths' notes."""

from __future__ import annotations

import numpy as np


def struck_tones(seconds: float, seed: int, rate: int = 16000,
                 harmonics: tuple[int, ...] = (1,), every_s: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = np.zeros_like(t)
    for onset in np.arange(0.2, seconds - 0.3, every_s):
        f0 = 440 * 2 ** ((rng.integers(48, 76) - 69) / 12)
        env = np.where(t >= onset, np.exp(-3 * (t - onset)), 0.0)
        x += sum(env * np.sin(2 * np.pi * k * f0 * (t - onset)) / k for k in harmonics)
    return (0.3 * x / np.abs(x).max()).astype(np.float32)
