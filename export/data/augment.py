"""Audio augmentation that keeps the labels consistent: gain, EQ tilt, reverb, noise, detune.

    out = augment(audio, notes, pedal, seed=3)      # Augmented(audio, notes, pedal, params)

Gain, EQ tilt, reverb and noise leave the timing alone (reverb adds a wet tail after the dry
signal; the direct sound stays where it was), so the labels pass through unchanged. Detune
resamples the audio by a factor f (~1 +- 0.5 %): the audio plays f times faster, so pitch
rises by 1200*log2(f) cents and every time shrinks by f; the labels (notes and pedal) are
divided by f too, and the audio keeps its length (zero-padded or cut), with notes that would
start after the end dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import soxr

from pianolm.runtime.notes import Note

from .common import Pedal

SAMPLE_RATE = 16000


@dataclass
class AugmentConfig:
    gain_db: tuple[float, float] = (-18.0, 0.0)   # applied to a peak-normalised clip
    tilt_probability: float = 0.6
    tilt_db_per_octave: tuple[float, float] = (-3.0, 2.0)
    reverb_probability: float = 0.5
    rt60: tuple[float, float] = (0.2, 1.6)          # seconds
    wet: tuple[float, float] = (0.05, 0.5)          # wet/dry energy ratio
    noise_probability: float = 0.5
    snr_db: tuple[float, float] = (15.0, 45.0)
    detune_probability: float = 0.4
    detune: float = 0.005                             # |f - 1| at most


@dataclass
class Augmented:
    audio: np.ndarray
    notes: list[Note]
    pedal: list[Pedal]
    params: dict = field(default_factory=dict)


def apply_gain(audio: np.ndarray, db: float) -> np.ndarray:
    return (audio * np.float32(10.0 ** (db / 20.0))).astype(np.float32)


def eq_tilt(audio: np.ndarray, db_per_octave: float, pivot_hz: float = 1000.0,
            sample_rate: int = SAMPLE_RATE, max_db: float = 15.0) -> np.ndarray:
    """A spectral tilt: gain(f) = db_per_octave * log2(f / pivot), limited to +-max_db."""
    n = len(audio)
    if n == 0 or db_per_octave == 0:
        return audio.astype(np.float32, copy=True)
    spec = np.fft.rfft(audio.astype(np.float64))
    f = np.fft.rfftfreq(n, 1.0 / sample_rate)
    gain_db = np.clip(db_per_octave * np.log2(np.maximum(f, 30.0) / pivot_hz), -max_db, max_db)
    return np.fft.irfft(spec * 10.0 ** (gain_db / 20.0), n).astype(np.float32)


def reverb_ir(rt60: float, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE,
              predelay: float = 0.01, damping_hz: float = 4000.0) -> np.ndarray:
    """A room tail: exponentially decaying noise (60 dB down after rt60), low-passed a little,
    starting `predelay` after the direct sound. Unit energy; no direct-path tap."""
    n = int((rt60 * 1.1 + predelay) * sample_rate)
    t = np.arange(n) / sample_rate
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / rt60)
    tail[: int(predelay * sample_rate)] = 0.0
    # one-pole low-pass: high frequencies die faster in a real room
    a = np.exp(-2 * np.pi * damping_hz / sample_rate)
    spec = np.fft.rfft(tail)
    f = np.fft.rfftfreq(n, 1.0 / sample_rate)
    spec *= (1 - a) / np.abs(1 - a * np.exp(-2j * np.pi * f / sample_rate))
    tail = np.fft.irfft(spec, n)
    return (tail / np.sqrt(np.sum(tail**2) + 1e-12)).astype(np.float32)


def add_reverb(audio: np.ndarray, rt60: float, wet: float, rng: np.random.Generator
               ) -> np.ndarray:
    """dry + wet-scaled room tail; same length as the input."""
    ir = reverb_ir(rt60, rng)
    n = len(audio) + len(ir) - 1
    size = 1 << max(1, (n - 1).bit_length())
    tail = np.fft.irfft(np.fft.rfft(audio, size) * np.fft.rfft(ir, size), size)[: len(audio)]
    return (audio + np.sqrt(wet) * tail).astype(np.float32)


def add_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator,
              colour: str = "white") -> np.ndarray:
    """Noise at `snr_db` below the clip's RMS (white, pink or brown)."""
    n = len(audio)
    noise = rng.standard_normal(n)
    if colour != "white" and n > 1:
        spec = np.fft.rfft(noise)
        f = np.maximum(np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE), 20.0)
        spec /= f ** (0.5 if colour == "pink" else 1.0)
        noise = np.fft.irfft(spec, n)
    signal_rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) or 1e-4
    noise *= signal_rms / (np.sqrt(np.mean(noise**2)) + 1e-12) * 10.0 ** (-snr_db / 20.0)
    return (audio + noise).astype(np.float32)


def detune(audio: np.ndarray, notes: Sequence[Note], pedal: Sequence[Pedal], factor: float
           ) -> tuple[np.ndarray, list[Note], list[Pedal]]:
    """Play the audio `factor` times faster (pitch up by factor, times divided by factor).

    The audio keeps its length; labels are time-scaled by 1/factor and notes that would now
    start at or after the end are dropped.
    """
    n = len(audio)
    y = soxr.resample(audio.astype(np.float32), SAMPLE_RATE * factor, SAMPLE_RATE,
                      quality="HQ").astype(np.float32)
    y = y[:n] if len(y) >= n else np.concatenate([y, np.zeros(n - len(y), np.float32)])
    end = n / SAMPLE_RATE
    out_notes = [Note(nt.onset / factor, nt.offset / factor, nt.pitch, nt.velocity)
                 for nt in notes if nt.onset / factor < end]
    out_pedal = [(d / factor, u / factor) for d, u in pedal if d / factor < end]
    return y, out_notes, out_pedal


def augment(audio: np.ndarray, notes: Sequence[Note], pedal: Sequence[Pedal], seed: int,
            config: AugmentConfig | None = None) -> Augmented:
    """Random augmentation chain: detune -> EQ tilt -> reverb -> noise -> gain (peak-safe).

    The clip is first scaled to peak 1, and gain then sets the level (the result's peak is at
    most 10^(max gain_db / 20) and never above 0.99).
    """
    cfg = config or AugmentConfig()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xA06]))
    x = np.asarray(audio, dtype=np.float32)
    notes, pedal = list(notes), list(pedal)
    params: dict = {}
    if rng.random() < cfg.detune_probability:
        factor = float(1.0 + rng.uniform(-cfg.detune, cfg.detune))
        x, notes, pedal = detune(x, notes, pedal, factor)
        params["detune"] = factor
    if rng.random() < cfg.tilt_probability:
        tilt = float(rng.uniform(*cfg.tilt_db_per_octave))
        x = eq_tilt(x, tilt)
        params["tilt_db_per_octave"] = round(tilt, 2)
    if rng.random() < cfg.reverb_probability:
        rt60, wet = float(rng.uniform(*cfg.rt60)), float(rng.uniform(*cfg.wet))
        x = add_reverb(x, rt60, wet, rng)
        params["reverb"] = {"rt60": round(rt60, 2), "wet": round(wet, 3)}
    if rng.random() < cfg.noise_probability:
        snr = float(rng.uniform(*cfg.snr_db))
        colour = str(rng.choice(["white", "pink", "brown"]))
        x = add_noise(x, snr, rng, colour)
        params["noise"] = {"snr_db": round(snr, 1), "colour": colour}
    peak = float(np.max(np.abs(x))) if len(x) else 0.0
    gain = float(rng.uniform(*cfg.gain_db))
    if peak > 0:
        x = x / np.float32(peak)
        x = apply_gain(x, min(gain, 20 * np.log10(0.99)))
    params["gain_db"] = round(gain, 2)
    return Augmented(x.astype(np.float32), notes, pedal, params)
