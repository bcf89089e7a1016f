"""Audio augmentation that keeps the labels consistent: the recording room and microphone,
compression, gain, EQ tilt, reverb, noise, detune.

    out = augment(audio, notes, pedal, seed=3)      # Augmented(audio, notes, pedal, params)

A room is a shoebox of random size and wall absorption (pyroomacoustics' image-source
model, Sabine's formula for the walls), with the piano at a random place in it and the
microphone 0.3-5 m away; its impulse response is aligned so the direct sound stays where it
was. A microphone is a random low cut and presence / air EQ (pedalboard's filters);
compression is pedalboard's compressor at moderate ratios (it changes levels, so it is rarer:
velocity is read from them).
These, gain, EQ tilt, reverb and noise leave the timing alone (reverb adds a wet tail after
the dry signal), so the labels pass through unchanged. Detune
resamples the audio by a factor f (~1 +- 0.5 %): the audio plays f times faster, so pitch
rises by 1200*log2(f) cents and every time shrinks by f; the labels (notes and pedal) are
divided by f too, and the audio keeps its length (zero-padded or cut), with notes that would
start after the end dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pedalboard
import pyroomacoustics as pra
import soxr

from pianolm.runtime.notes import Note

from .common import Pedal

SAMPLE_RATE = 16000


@dataclass
class AugmentConfig:
    gain_db: tuple[float, float] = (-18.0, 0.0)   # applied to a peak-normalised clip
    room_probability: float = 0.5
    room_rt60: tuple[float, float] = (0.15, 1.2)   # seconds (Sabine; image order is capped)
    room_size: tuple[float, float] = (3.0, 16.0)   # metres, each wall length
    mic_probability: float = 0.5
    compress_probability: float = 0.25
    tilt_probability: float = 0.6
    tilt_db_per_octave: tuple[float, float] = (-3.0, 2.0)
    reverb_probability: float = 0.3
    rt60: tuple[float, float] = (0.2, 1.6)          # seconds
    wet: tuple[float, float] = (0.05, 0.5)          # wet/dry energy ratio
    noise_probability: float = 0.5
    snr_db: tuple[float, float] = (15.0, 45.0)
    detune_probability: float = 0.4
    detune: float = 0.005                             # |f - 1| at most


# A recording, not a training augmentation: every clip in a room through a microphone, at a
# level somewhat below full scale; no added noise, compression, tilt, tail or detune. The
# held-out pianos' validation and evaluation renders use it (benchmarks/make_heldout_set.py).
RECORDED = AugmentConfig(gain_db=(-6.0, 0.0), room_probability=1.0, mic_probability=1.0,
                         compress_probability=0.0, tilt_probability=0.0,
                         reverb_probability=0.0, noise_probability=0.0,
                         detune_probability=0.0)
CONDITIONS = {"train": AugmentConfig(), "recorded": RECORDED}


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
    tail = convolve(audio, reverb_ir(rt60, rng))
    return (audio + np.sqrt(wet) * tail).astype(np.float32)


def room_ir(rng: np.random.Generator, rt60: float, size: tuple[float, float] = (3.0, 16.0),
            max_order: int = 40) -> tuple[np.ndarray, dict]:
    """A random shoebox room's impulse response from piano to microphone, starting at the
    direct sound (unit peak there), and the room's description."""
    dims = np.array([rng.uniform(*size), rng.uniform(*size),
                     rng.uniform(2.4, min(8.0, size[1]))])
    # a big room cannot be drier than fully absorbing walls make it (Sabine: absorption <= 1)
    volume = float(np.prod(dims))
    surface = 2.0 * float(dims[0] * dims[1] + dims[0] * dims[2] + dims[1] * dims[2])
    rt60 = max(rt60, 1.2 * 24.0 * np.log(10.0) * volume / (pra.constants.get("c") * surface))
    absorption, order = pra.inverse_sabine(rt60, dims)
    room = pra.ShoeBox(dims, fs=SAMPLE_RATE, materials=pra.Material(float(absorption)),
                       max_order=int(min(order, max_order)), air_absorption=True)
    # the piano anywhere; the microphone where one records a piano: 0.3-5 m away
    margin = 0.5
    source = np.array([rng.uniform(margin, d - margin) for d in dims[:2]]
                      + [rng.uniform(0.8, 1.2)])
    angle, distance = rng.uniform(0.0, 2 * np.pi), np.exp(rng.uniform(np.log(0.3), np.log(5.0)))
    mic = source + distance * np.array([np.cos(angle), np.sin(angle), 0.0])
    mic[2] = rng.uniform(1.0, 2.5)
    mic = np.clip(mic, margin, dims - margin)
    room.add_source(list(source))
    room.add_microphone(list(mic))
    room.compute_rir()
    ir = np.asarray(room.rir[0][0], dtype=np.float64)
    direct = int(np.argmax(np.abs(ir)))  # the direct path is the strongest arrival
    ir = ir[direct:] / (abs(ir[direct]) + 1e-12)
    distance = float(np.linalg.norm(source - mic))
    return ir.astype(np.float32), {"dims": [round(float(d), 1) for d in dims],
                                   "rt60": round(rt60, 2), "distance": round(distance, 2)}


def convolve(audio: np.ndarray, ir: np.ndarray) -> np.ndarray:
    """audio * ir (FFT convolution), cut to the input's length."""
    n = len(audio) + len(ir) - 1
    size = 1 << max(1, (n - 1).bit_length())
    return np.fft.irfft(np.fft.rfft(audio, size) * np.fft.rfft(ir, size), size)[: len(audio)]


def mic_chain(rng: np.random.Generator) -> tuple[pedalboard.Pedalboard, dict]:
    """A microphone and preamp colour: low cut, a presence peak or dip, an air shelf."""
    low_cut = float(np.exp(rng.uniform(np.log(30.0), np.log(150.0))))
    peak_hz = float(np.exp(rng.uniform(np.log(300.0), np.log(6000.0))))
    peak_db, shelf_db = float(rng.uniform(-6.0, 6.0)), float(rng.uniform(-8.0, 3.0))
    board = pedalboard.Pedalboard([
        pedalboard.HighpassFilter(cutoff_frequency_hz=low_cut),
        pedalboard.PeakFilter(cutoff_frequency_hz=peak_hz, gain_db=peak_db,
                              q=float(rng.uniform(0.7, 2.0))),
        pedalboard.HighShelfFilter(cutoff_frequency_hz=float(rng.uniform(3000.0, 7000.0)),
                                   gain_db=shelf_db),
    ])
    return board, {"low_cut_hz": round(low_cut), "peak_hz": round(peak_hz),
                   "peak_db": round(peak_db, 1), "shelf_db": round(shelf_db, 1)}


def compressor(rng: np.random.Generator) -> tuple[pedalboard.Pedalboard, dict]:
    """A bus compressor at a moderate ratio (threshold relative to a peak-1 clip)."""
    params = {"threshold_db": round(float(rng.uniform(-30.0, -12.0)), 1),
              "ratio": round(float(rng.uniform(1.5, 4.0)), 2),
              "attack_ms": round(float(rng.uniform(3.0, 30.0)), 1),
              "release_ms": round(float(rng.uniform(50.0, 300.0)))}
    return pedalboard.Pedalboard([pedalboard.Compressor(**params)]), params


def _through(board: pedalboard.Pedalboard, audio: np.ndarray) -> np.ndarray:
    return board(audio.astype(np.float32), SAMPLE_RATE).astype(np.float32)


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
    """Random augmentation chain: detune -> room -> microphone -> EQ tilt -> reverb ->
    compression -> noise -> gain (peak-safe).

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
    if rng.random() < cfg.room_probability:
        ir, params["room"] = room_ir(rng, float(rng.uniform(*cfg.room_rt60)), cfg.room_size)
        x = convolve(x, ir).astype(np.float32)
    if rng.random() < cfg.mic_probability:
        board, params["mic"] = mic_chain(rng)
        x = _through(board, x)
    if rng.random() < cfg.tilt_probability:
        tilt = float(rng.uniform(*cfg.tilt_db_per_octave))
        x = eq_tilt(x, tilt)
        params["tilt_db_per_octave"] = round(tilt, 2)
    if rng.random() < cfg.reverb_probability and "room" not in params:  # one room per clip
        rt60, wet = float(rng.uniform(*cfg.rt60)), float(rng.uniform(*cfg.wet))
        x = add_reverb(x, rt60, wet, rng)
        params["reverb"] = {"rt60": round(rt60, 2), "wet": round(wet, 3)}
    if rng.random() < cfg.compress_probability:
        peak = float(np.max(np.abs(x))) if len(x) else 0.0
        board, params["compress"] = compressor(rng)
        x = _through(board, x / np.float32(peak or 1.0))
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
