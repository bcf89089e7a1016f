"""Front-ends (export/frontend.py) against float64 numpy references evaluated directly."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pianolm.export.frontend import (  # noqa: E402
    CQT,
    CQTConfig,
    LogMel,
    LogMelConfig,
    hz_to_mel_slaney,
    mel_filterbank,
    mel_to_hz_slaney,
)

SR = 16000
SEGMENT = 160000


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny ops under OpenMP with two threads on a shared 2-core machine can run ~25x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _test_signal(n: int = SEGMENT, f1: float = 7000.0, seed: int = 0) -> np.ndarray:
    """Exponential chirp 30 Hz -> f1, two steady sines and a -60 dB noise floor."""
    t = np.arange(n) / SR
    f0, dur = 30.0, n / SR
    phase = 2 * np.pi * f0 * dur / np.log(f1 / f0) * ((f1 / f0) ** (t / dur) - 1)
    rng = np.random.default_rng(seed)
    return (
        0.3 * np.sin(phase)
        + 0.2 * np.sin(2 * np.pi * 440.0 * t)
        + 0.1 * np.sin(2 * np.pi * 55.0 * t + 1.0)
        + 1e-3 * rng.standard_normal(n)
    )


def _run(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module(torch.tensor(np.atleast_2d(x), dtype=torch.float32)).numpy()


# ----------------------------------------------------------------------------- mel filters


def test_slaney_mel_scale():
    assert hz_to_mel_slaney(1000.0) == pytest.approx(15.0)
    assert hz_to_mel_slaney(500.0) == pytest.approx(7.5)  # linear below 1 kHz
    assert hz_to_mel_slaney(6400.0) == pytest.approx(42.0)  # 27 mels per factor 6.4 above
    hz = np.geomspace(10.0, 8000.0, 50)
    np.testing.assert_allclose(mel_to_hz_slaney(hz_to_mel_slaney(hz)), hz, rtol=1e-12)


def test_mel_filterbank_matches_librosa_reference_values():
    # librosa.filters.mel(sr=22050, n_fft=2048) (128 mels, Slaney), first filters, as
    # published by librosa's docs example and reproduced by ports of it.
    m = mel_filterbank(22050, 2048, 128, 0.0, 11025.0)
    assert m.shape == (128, 1025)
    np.testing.assert_allclose(
        m[0, :6],
        [
            0,
            0.016182853208219942,
            0.032365706416439884,
            0.028990088037379964,
            0.012807234829160026,
            0,
        ],
        atol=1e-12,
    )
    np.testing.assert_allclose(
        m[1, :9],
        [
            0,
            0,
            0,
            0.009779235793639925,
            0.025962089001859864,
            0.035393705451959974,
            0.01921085224374004,
            0.003027999035520103,
            0,
        ],
        atol=1e-12,
    )


def test_mel_filterbank_slaney_properties():
    n_fft, n_mels, fmin, fmax = 2048, 229, 30.0, 8000.0
    m = mel_filterbank(SR, n_fft, n_mels, fmin, fmax)
    assert m.shape == (n_mels, n_fft // 2 + 1) and (m >= 0).all()
    edges = mel_to_hz_slaney(
        np.linspace(hz_to_mel_slaney(fmin), hz_to_mel_slaney(fmax), n_mels + 2)
    )
    # Edges equally spaced in Slaney mels (linear below 1 kHz, logarithmic above).
    assert np.allclose(np.diff(hz_to_mel_slaney(edges)), np.diff(hz_to_mel_slaney(edges))[0])
    fft_hz = np.linspace(0, SR / 2, n_fft // 2 + 1)
    bin_hz = fft_hz[1]
    for i in range(n_mels):
        lo, centre, hi = edges[i : i + 3]
        support = fft_hz[m[i] > 0]
        assert support.min() > lo and support.max() < hi  # zero outside its triangle
        peak = fft_hz[np.argmax(m[i])]
        assert abs(peak - centre) < bin_hz  # peaks at a bin next to the mel-spaced centre
        # Slaney area normalisation: peak height 2 / (hi - lo), i.e. unit area in Hz...
        height = 2.0 / (hi - lo)
        assert m[i].max() <= height * (1 + 1e-12)
        assert m[i].max() >= height * (1 - bin_hz / (centre - lo))
        # ...so the sampled triangle sums to ~1 / bin width (exactly up to sampling).
        assert m[i].sum() * bin_hz == pytest.approx(1.0, abs=0.15)


# ----------------------------------------------------------------------------- log-mel


def test_logmel_matches_numpy_reference():
    cfg = LogMelConfig()
    x = _test_signal(f1=7900.0)
    ours = _run(LogMel(cfg), x)[0]
    assert ours.shape == (SEGMENT // cfg.hop_length + 1, cfg.n_mels) == (1001, 229)

    # Direct float64 evaluation: reflect-padded centred frames, periodic Hann, rfft power.
    half = cfg.n_fft // 2
    padded = np.pad(x, half, mode="reflect")
    starts = np.arange(ours.shape[0]) * cfg.hop_length
    frames = padded[starts[:, None] + np.arange(cfg.n_fft)]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(cfg.n_fft) / cfg.n_fft)
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    mel = power @ mel_filterbank(SR, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax).T
    ref = 10 * np.log10(np.maximum(mel, 1e-10))

    valid = ref > -60.0  # float32 STFT noise dominates far below that
    assert valid.mean() > 0.99
    err = np.abs(ours - ref)[valid]
    assert err.max() < 1e-2, f"log-mel max error {err.max():.2e} dB"


def test_logmel_frame_count():
    m = LogMel()
    for n in (16000, 16001, 16159):
        assert _run(m, np.zeros(n) + 0.1).shape == (1, n // 160 + 1, 229)
        assert m.num_frames(n) == n // 160 + 1


# ----------------------------------------------------------------------------- CQT


def _cqt_reference(x: np.ndarray, frames: np.ndarray, cfg: CQTConfig) -> np.ndarray:
    """|CQT| by direct inner products of full-length complex kernels, float64.

    Kernel of bin k: Hann window of l_k = ceil(Q sr / f_k) samples centred on the frame,
    times exp(2 pi i f_k tau / sr), L1-normalised, times sqrt(l_k) (nnAudio/librosa scale).
    """
    q = cfg.filter_scale / (2 ** (1 / cfg.bins_per_octave) - 1)
    freqs = cfg.fmin * 2.0 ** (np.arange(cfg.n_bins) / cfg.bins_per_octave)
    lengths = np.ceil(q * SR / freqs).astype(int)
    pad = int(lengths.max()) // 2 + 1
    padded = np.pad(x, pad, mode="reflect")
    out = np.zeros((len(frames), cfg.n_bins))
    centres = pad + frames * cfg.hop_length
    for k, (f, length) in enumerate(zip(freqs, lengths, strict=True)):
        half = length // 2
        tau = np.arange(-half, half + 1)
        w = np.where(np.abs(tau) < length / 2, 0.5 + 0.5 * np.cos(2 * np.pi * tau / length), 0)
        kernel = w * np.exp(2j * np.pi * f * tau / SR) / w.sum() * math.sqrt(length)
        segs = padded[centres[:, None] + tau[None, :]]
        resp = segs @ np.stack([kernel.real, kernel.imag], axis=1)
        out[:, k] = np.hypot(resp[:, 0], resp[:, 1])
    return out


@pytest.fixture(scope="module")
def cqt() -> CQT:
    return CQT()


def test_cqt_matches_direct_reference(cqt: CQT):
    cfg = cqt.config
    x = _test_signal(f1=4000.0)
    n_frames = SEGMENT // cfg.hop_length + 1
    frames = np.union1d(np.arange(0, n_frames, 16), [1, 2, n_frames - 2, n_frames - 1])
    ref = _cqt_reference(x, frames, cfg)
    with torch.inference_mode():
        xt = torch.tensor(x[None], dtype=torch.float32)
        mag = cqt.magnitude(xt)[0].numpy().T
        db = cqt(xt)[0].numpy()
    assert mag.shape == db.shape == (n_frames, cfg.n_bins) == (501, 352)
    mag, db = mag[frames], db[frames]

    ref_db = 20 * np.log10(ref)
    err = np.abs(20 * np.log10(mag) - ref_db)
    top = ref_db.max()
    # Multirate evaluation vs the direct full-rate one (amplitude dB). Achieved here:
    # 0.003 dB within 60 dB of the maximum, 0.05 dB within 80 dB, 0.15 dB within 100 dB.
    # (Deeper bins, down to -136 dB at frame 0 where reflect padding makes C real, reach
    # float32 rounding.)
    assert err[ref_db > top - 60].max() < 0.02
    assert err[ref_db > top - 80].max() < 0.2
    assert err[ref_db > top - 100].max() < 1.0

    # The module output: 10 * log10 |C| (HPPNet's AmplitudeToDB on a magnitude), floored
    # at its own maximum - 80 (not reached within 100 dB of amplitude).
    ref_out = 10 * np.log10(ref)
    ref_out = np.maximum(ref_out, ref_out.max() - cfg.top_db)
    assert np.abs(db - ref_out)[ref_db > top - 100].max() < 0.5


def test_cqt_pure_tone_peaks_at_its_bin(cqt: CQT):
    n = 32000
    t = np.arange(n) / SR
    pitches = [21, 22, 28, 33, 45, 57, 60, 69, 81, 93, 100, 105, 108]  # A0 .. C8
    freqs = [440.0 * 2 ** ((p - 69) / 12) for p in pitches] + [1000.0, 3000.0]
    # Bin k is centred on fmin * 2^(k/48) with fmin a quarter-tone below A0.
    expected = [round(2 + 48 * math.log2(f / 27.5)) for f in freqs]
    assert expected[: len(pitches)] == [4 * (p - 21) + 2 for p in pitches]
    x = np.stack([0.5 * np.sin(2 * np.pi * f * t + 0.3) for f in freqs])
    with torch.inference_mode():
        mag = cqt.magnitude(torch.tensor(x, dtype=torch.float32)).numpy()  # [B, bins, T]
    middle = mag.shape[-1] // 2
    found = mag[:, :, middle - 5 : middle + 5].mean(-1).argmax(-1)
    assert found.tolist() == expected


def test_cqt_db_is_relative_to_each_example(cqt: CQT):
    x = _test_signal(n=32000)
    batch = np.stack([x, 1e-3 * x])
    out = _run(cqt, batch)
    alone = _run(cqt, batch[1])
    # No coupling across the batch (float32 noise only: bins 50 dB down differ by < 0.1 dB).
    np.testing.assert_allclose(out[1], alone[0], atol=0.1)
    for example in out:
        assert example.min() >= example.max() - cqt.config.top_db - 1e-4
    # 60 dB quieter = 30 dB lower in 10 * log10 |C|, where neither is floored.
    unclipped = (out[0] > out[0].max() - 50) & (out[1] > out[1].max() - 50)
    np.testing.assert_allclose((out[0] - out[1])[unclipped], 30.0, atol=0.05)


def test_cqt_frame_count_and_weights(cqt: CQT):
    for n in (cqt.min_samples, 32000, 40111):
        assert _run(cqt, 0.1 * np.sin(np.arange(n) * 0.05)).shape == (1, n // 320 + 1, 352)
        assert cqt.num_frames(n) == n // 320 + 1
    weights = sum(b.numel() * b.element_size() for b in cqt.buffers())
    assert weights < 4e6  # a full-rate kernel bank would be ~116 MB
