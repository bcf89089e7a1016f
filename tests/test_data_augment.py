"""Augmentation keeps labels consistent with the audio."""

from __future__ import annotations

import numpy as np

from pianolm.export.data import augment as A
from pianolm.runtime.notes import Note

SR = 16000


def clicks(onsets: list[float], seconds: float) -> np.ndarray:
    """Short decaying 1 kHz bursts at the onsets."""
    x = np.zeros(int(seconds * SR), np.float32)
    t = np.arange(int(0.08 * SR)) / SR
    burst = (np.sin(2 * np.pi * 1000 * t) * np.exp(-t / 0.015)).astype(np.float32)
    for o in onsets:
        i = int(round(o * SR))
        x[i:i + len(burst)] += burst[: len(x) - i]
    return x


def detect(x: np.ndarray, n: int) -> list[float]:
    """The n strongest energy rises (5 ms hops), in time order."""
    hop = 80
    e = np.array([np.sum(x[i:i + hop] ** 2) for i in range(0, len(x) - hop, hop)])
    rise = np.maximum(np.diff(np.log(e + 1e-9)), 0)
    picks: list[int] = []
    for k in np.argsort(rise)[::-1]:
        if all(abs(k - p) > 20 for p in picks):
            picks.append(int(k))
        if len(picks) == n:
            break
    return sorted((p + 1) * hop / SR for p in picks)


ONSETS = [0.2, 0.9, 1.7, 2.6, 3.4, 3.95]
NOTES = [Note(o, o + 0.3, 60 + i, 80) for i, o in enumerate(ONSETS)]
PEDAL = [(0.5, 1.5), (3.0, 3.9)]


def test_detune_scales_labels_with_the_audio():
    x = clicks(ONSETS, 4.0)
    for factor in (1.005, 0.995):
        y, notes, pedal = A.detune(x, NOTES, PEDAL, factor)
        assert len(y) == len(x)
        found = detect(y, len(notes))
        assert len(notes) == len(found)
        for n, t in zip(notes, found, strict=True):
            assert abs(n.onset - t) < 0.006
        assert pedal[0] == (0.5 / factor, 1.5 / factor)
    # a note starting after the shortened end is dropped
    _, notes, _ = A.detune(clicks([0.5], 1.0), [Note(0.5, 0.6, 60), Note(0.998, 1.2, 62)], [],
                           0.995)
    assert [n.pitch for n in notes] == [60]


def test_detune_shifts_pitch():
    t = np.arange(SR) / SR
    x = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    y, _, _ = A.detune(x, [], [], 1.005)
    spec = np.abs(np.fft.rfft(y[: SR // 2] * np.hanning(SR // 2), 1 << 18))
    f = np.fft.rfftfreq(1 << 18, 1 / SR)[np.argmax(spec)]
    assert abs(f - 440 * 1.005) < 0.3


def test_other_augmentations_keep_timing_and_length():
    x = clicks(ONSETS, 4.0)
    rng = np.random.default_rng(0)
    room, _ = A.room_ir(rng, 0.8)
    mic, _ = A.mic_chain(rng)
    comp, _ = A.compressor(rng)
    for y in (A.eq_tilt(x, 3.0), A.add_reverb(x, 0.8, 0.4, rng), A.add_noise(x, 30.0, rng),
              A.apply_gain(x, -6.0), A.convolve(x, room).astype(np.float32),
              A._through(mic, x), A._through(comp, x)):
        assert len(y) == len(x) and y.dtype == np.float32
        found = detect(y, len(ONSETS))
        assert max(abs(a - b) for a, b in zip(found, ONSETS, strict=True)) < 0.006


def test_augment_chain():
    x = clicks(ONSETS, 4.0)
    seen = set()
    for seed in range(30):
        out = A.augment(x, NOTES, PEDAL, seed)
        assert len(out.audio) == len(x) and np.isfinite(out.audio).all()
        assert 0 < np.abs(out.audio).max() <= 0.99
        seen |= set(out.params)
        factor = out.params.get("detune", 1.0)
        assert [n.onset for n in out.notes] == [n.onset / factor for n in NOTES]
        found = detect(out.audio, len(out.notes))
        assert max(abs(a - n.onset) for a, n in zip(found, out.notes, strict=True)) < 0.008
    assert {"detune", "room", "mic", "compress", "tilt_db_per_octave", "reverb", "noise",
            "gain_db"} <= seen
    a, b = A.augment(x, NOTES, PEDAL, 3), A.augment(x, NOTES, PEDAL, 3)
    assert np.array_equal(a.audio, b.audio) and a.params == b.params


def test_noise_snr_and_tilt_direction():
    rng = np.random.default_rng(1)
    x = (0.1 * np.sin(2 * np.pi * 500 * np.arange(SR) / SR)).astype(np.float32)
    y = A.add_noise(x, 20.0, rng)
    snr = 10 * np.log10(np.mean(x**2) / np.mean((y - x) ** 2))
    assert abs(snr - 20.0) < 0.5
    white = rng.standard_normal(SR).astype(np.float32)
    bright = A.eq_tilt(white, 3.0)
    spec = np.abs(np.fft.rfft(bright)) ** 2
    f = np.fft.rfftfreq(SR, 1 / SR)
    assert spec[(f > 4000) & (f < 8000)].mean() > 10 * spec[(f > 100) & (f < 300)].mean()


def test_recorded_conditions_are_a_room_and_a_microphone_only():
    x = clicks(ONSETS, 4.0)
    for seed in range(5):
        out = A.augment(x, NOTES, PEDAL, seed, A.RECORDED)
        assert set(out.params) == {"room", "mic", "gain_db"}
        assert 0.3 - 1e-6 <= out.params["room"]["distance"] <= 5.0 + 1e-6
        assert out.notes == list(NOTES)  # no detune: the labels are the notes as played
        found = detect(out.audio, len(out.notes))
        assert max(abs(a - n.onset) for a, n in zip(found, out.notes, strict=True)) < 0.008
