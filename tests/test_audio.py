"""runtime/audio.py: reading, mixing, resampling, errors, segmenting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pianolm.runtime.audio import (
    SAMPLE_RATE,
    SEGMENT_SAMPLES,
    AudioError,
    iter_segment_batches,
    load_audio,
    num_segments,
    prepare_audio,
    segment_audio,
)

DEVSET = Path("/work/shared/devset")


def sine(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(sr * seconds))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float64)


def peak_hz(x: np.ndarray, sr: int = SAMPLE_RATE) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)])


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt, subtype, ext, atol", [
    ("WAV", "PCM_16", "wav", 1 / 32768 + 1e-7),
    ("WAV", "PCM_24", "wav", 1 / 2 ** 23 + 1e-7),
    ("WAV", "PCM_32", "wav", 1e-7),
    ("WAV", "FLOAT", "wav", 1e-7),
    ("WAV", "PCM_U8", "wav", 1 / 128 + 1e-7),
    ("FLAC", "PCM_16", "flac", 1 / 32768 + 1e-7),
    ("FLAC", "PCM_24", "flac", 1 / 2 ** 23 + 1e-7),
    ("OGG", "VORBIS", "ogg", None),
])
def test_formats_read_as_float32_mono(tmp_path, fmt, subtype, ext, atol):
    x = sine(440.0, SAMPLE_RATE, 1.0)
    path = tmp_path / f"a.{ext}"
    sf.write(path, x, SAMPLE_RATE, format=fmt, subtype=subtype)
    y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1 and y.flags.c_contiguous
    assert len(y) == len(x)
    if atol is not None:
        np.testing.assert_allclose(y, x, atol=atol)
    else:  # lossy: the tone and its level survive
        assert abs(peak_hz(y) - 440.0) <= 2.0
        assert 0.4 < np.abs(y).max() < 0.6


def test_load_audio_accepts_str_path(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, sine(440, SAMPLE_RATE, 0.1), SAMPLE_RATE)
    assert load_audio(str(path)).shape == (1600,)


@pytest.mark.parametrize("channels", [2, 5])
def test_multichannel_mixed_to_mono_by_mean(tmp_path, channels):
    base = sine(440.0, SAMPLE_RATE, 0.5)
    gains = np.linspace(-0.5, 1.0, channels)
    x = base[:, None] * gains[None, :]
    path = tmp_path / f"c{channels}.wav"
    sf.write(path, x, SAMPLE_RATE, subtype="FLOAT")
    y = load_audio(path)
    assert y.shape == (len(base),)
    np.testing.assert_allclose(y, base * gains.mean(), atol=1e-6)


def test_stereo_flac_at_441k(tmp_path):
    left, right = sine(440.0, 44100, 1.0, 0.4), sine(440.0, 44100, 1.0, 0.2)
    path = tmp_path / "s.flac"
    sf.write(path, np.stack([left, right], 1), 44100, format="FLAC", subtype="PCM_16")
    y = load_audio(path)
    assert y.shape == (16000,)
    assert abs(peak_hz(y) - 440.0) <= 1.0
    assert abs(np.abs(y[1000:-1000]).max() - 0.3) < 0.01  # mean of the two channels


@pytest.mark.parametrize("sr, freq, seconds", [
    (44100, 440.0, 1.0),
    (44100, 3000.0, 1.37),
    (8000, 1000.0, 1.0),
    (8000, 250.0, 0.9),
    (48000, 5000.0, 0.5),
    (22050, 2637.0, 1.25),
])
def test_resampled_to_16k_keeps_frequency_and_length(tmp_path, sr, freq, seconds):
    x = sine(freq, sr, seconds)
    path = tmp_path / "r.wav"
    sf.write(path, x, sr, subtype="PCM_16")
    y = load_audio(path)
    assert y.dtype == np.float32
    assert abs(len(y) - len(x) * SAMPLE_RATE / sr) <= 1
    bin_hz = SAMPLE_RATE / len(y)
    assert abs(peak_hz(y) - freq) <= bin_hz
    # a real resampler keeps the level (no aliasing / attenuation in band)
    assert abs(np.sqrt(np.mean(y[2000:-2000] ** 2)) - 0.5 / np.sqrt(2)) < 0.01


def test_prepare_audio_resamples_like_load_audio(tmp_path):
    x = sine(440.0, 44100, 0.7)
    path = tmp_path / "r.wav"
    sf.write(path, x, 44100, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), prepare_audio(x.astype(np.float32), 44100),
                               atol=1e-6)


# ----------------------------------------------------------------------------- in memory


def test_prepare_audio_integer_scaling():
    i16 = np.array([-32768, 0, 16384, 32767], dtype=np.int16)
    np.testing.assert_allclose(prepare_audio(i16, SAMPLE_RATE), [-1.0, 0.0, 0.5, 32767 / 32768])
    i32 = np.array([-2 ** 31, 0, 2 ** 30], dtype=np.int32)
    np.testing.assert_allclose(prepare_audio(i32, SAMPLE_RATE), [-1.0, 0.0, 0.5])
    u8 = np.array([0, 128, 192], dtype=np.uint8)
    np.testing.assert_allclose(prepare_audio(u8, SAMPLE_RATE), [-1.0, 0.0, 0.5])
    f64 = np.array([0.25, -2.0])  # float kept as is (no clipping)
    out = prepare_audio(f64, SAMPLE_RATE)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.25, -2.0])


def test_prepare_audio_multichannel_int16():
    x = np.array([[32767, -32768], [16384, 16384], [0, -16384]], dtype=np.int16)
    np.testing.assert_allclose(prepare_audio(x, SAMPLE_RATE),
                               [(32767 / 32768 - 1) / 2, 0.5, -0.25], atol=1e-7)


@pytest.mark.parametrize("samples, rate, words", [
    (np.zeros(0, np.float32), 16000, "empty"),
    (np.zeros((0, 2), np.float32), 16000, "empty"),
    (np.zeros((2, 5000), np.float32), 16000, "[channels, n]"),
    (np.zeros((4, 4, 4), np.float32), 16000, "shape"),
    (np.array([0.0, np.nan, 0.0]), 16000, "NaN"),
    (np.array([[0.0, 0.0], [0.0, np.inf]]), 16000, "NaN or infinite"),
    (np.zeros(10, np.float32), 0, "sample rate"),
    (np.zeros(10, np.float32), "fast", "sample rate"),
    (np.zeros(10, np.complex64), 16000, "sample type"),
])
def test_prepare_audio_errors(samples, rate, words):
    with pytest.raises(AudioError) as info:
        prepare_audio(samples, rate)
    msg = str(info.value)
    assert words in msg and "\n" not in msg and msg.startswith("<array>: ")


# ----------------------------------------------------------------------------- file errors


def _one_line_error(path) -> str:
    with pytest.raises(AudioError) as info:
        load_audio(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg
    assert info.value.__cause__ is None  # no chained soundfile traceback
    return msg


def test_missing_file(tmp_path):
    assert "not found" in _one_line_error(tmp_path / "nope.wav")


def test_text_file_named_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 20)
    msg = _one_line_error(path)
    assert "cannot read audio" in msg and "WAV, FLAC or OGG" in msg


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    assert "empty" in _one_line_error(path)


def test_wav_without_samples(tmp_path):
    path = tmp_path / "zero.wav"
    sf.write(path, np.zeros((0, 1)), SAMPLE_RATE)
    assert "empty" in _one_line_error(path)


def test_truncated_header(tmp_path):
    src = tmp_path / "ok.wav"
    sf.write(src, sine(440, SAMPLE_RATE, 0.1), SAMPLE_RATE)
    path = tmp_path / "cut.wav"
    path.write_bytes(src.read_bytes()[:20])
    _one_line_error(path)


def test_nan_in_float_wav(tmp_path):
    x = sine(440, SAMPLE_RATE, 0.5).astype(np.float32)
    x[4000] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, x, SAMPLE_RATE, subtype="FLOAT")
    msg = _one_line_error(path)
    assert "NaN" in msg and "0.250 s" in msg


def test_directory(tmp_path):
    assert "directory" in _one_line_error(tmp_path)


# ----------------------------------------------------------------------------- segments


@pytest.mark.parametrize("n, expected", [
    (0, 1), (1, 1), (16000, 1), (SEGMENT_SAMPLES - 1, 1), (SEGMENT_SAMPLES, 1),
    (SEGMENT_SAMPLES + 1, 2), (3 * SEGMENT_SAMPLES, 3), (3 * SEGMENT_SAMPLES + 7, 4),
])
def test_segment_audio_lengths_and_padding(n, expected):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    segs = segment_audio(x)
    assert segs.shape == (expected, SEGMENT_SAMPLES) and segs.dtype == np.float32
    assert num_segments(n) == expected
    flat = segs.reshape(-1)
    np.testing.assert_array_equal(flat[:n], x)
    assert not flat[n:].any()


@pytest.mark.parametrize("n_segments_in, batch_size", [(1, 4), (7, 3), (6, 3), (5, 1), (2, 8)])
def test_iter_segment_batches_matches_segment_audio(n_segments_in, batch_size):
    n = n_segments_in * SEGMENT_SAMPLES - 12345
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    whole = segment_audio(x)
    seen = 0
    for first, batch in iter_segment_batches(x, batch_size):
        assert first == seen
        assert 1 <= batch.shape[0] <= batch_size and batch.dtype == np.float32
        np.testing.assert_array_equal(batch, whole[first:first + batch.shape[0]])
        seen += batch.shape[0]
    assert seen == len(whole)


def test_iter_segment_batches_short_and_invalid():
    batches = list(iter_segment_batches(np.zeros(3, np.float32), 4))
    assert len(batches) == 1 and batches[0][0] == 0 and batches[0][1].shape == (1, SEGMENT_SAMPLES)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            next(iter_segment_batches(np.zeros(3, np.float32), bad))
    with pytest.raises(ValueError):
        segment_audio(np.zeros((10, 2), np.float32))


# ----------------------------------------------------------------------------- dev set


@pytest.mark.skipif(not DEVSET.is_dir(), reason="shared dev set not present")
def test_devset_audio_loads():
    clips = json.loads((DEVSET / "clips.json").read_text())
    for clip in clips:
        path = DEVSET / clip["audio"]
        info = sf.info(path)
        assert (info.samplerate, info.channels) == (clip["sample_rate"], clip["channels"])
        y = load_audio(path)
        assert abs(len(y) - info.frames * SAMPLE_RATE / info.samplerate) <= 1
        assert abs(len(y) / SAMPLE_RATE - clip["audio_len_s"]) < 0.01
        assert np.isfinite(y).all() and 0.1 < np.abs(y).max() <= 1.0
        assert segment_audio(y).shape == (2, SEGMENT_SAMPLES)  # every clip is 10-20 s


def test_audio_and_midi_do_not_import_torch():
    code = ("import sys, pianolm.runtime.audio, pianolm.runtime.midi; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
