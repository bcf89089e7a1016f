"""runtime/audio.py: reading, mixing, resampling, errors, segmenting."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
import soxr

from pianolm.runtime.audio import (
    SAMPLE_RATE,
    SEGMENT_SAMPLES,
    AudioError,
    AudioInfo,
    batch_segments,
    iter_segment_batches,
    load_audio,
    num_segments,
    prepare_audio,
    probe_audio,
    resampled_length,
    segment_audio,
    segments_from_array,
    stream_segments,
)


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
    assert "cannot read audio" in msg and "WAV, FLAC, OGG or MP3" in msg


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


# ----------------------------------------------------------------------------- streaming


def noise_file(path, sr: int, seconds: float, channels: int = 1, fmt: str = "WAV",
               subtype: str = "PCM_16", seed: int = 0) -> None:
    """Band-limited-ish noise plus a tone: exercises the resampler's whole passband."""
    n = int(round(sr * seconds))
    rng = np.random.default_rng(seed)
    x = 0.2 * rng.standard_normal((n, channels)) + 0.3 * np.sin(
        2 * np.pi * 1234.5 * np.arange(n) / sr)[:, None]
    sf.write(path, np.clip(x, -0.99, 0.99), sr, format=fmt, subtype=subtype)


def oneshot_16k(path) -> np.ndarray:
    """Independent reference: whole file, numpy mix-down, one soxr.resample call."""
    x, sr = sf.read(path, dtype="float32", always_2d=True)
    mono = x.mean(axis=1, dtype=np.float32)
    return mono if sr == SAMPLE_RATE else soxr.resample(mono, sr, SAMPLE_RATE, quality="HQ")


@pytest.mark.parametrize("sr, channels, fmt, subtype, seconds, block_seconds", [
    (16000, 1, "WAV", "PCM_16", 23.4567, 10.0),
    (16000, 2, "WAV", "FLOAT", 20.0, 3.3),       # exactly two segments: no padded tail
    (44100, 2, "FLAC", "PCM_16", 21.37, 10.0),
    (44100, 1, "WAV", "PCM_16", 12.001, 0.77),   # blocks far from segment boundaries
    (22050, 1, "WAV", "FLOAT", 15.5, 10.0),
    (48000, 5, "WAV", "FLOAT", 11.11, 4.0),
    (8000, 1, "FLAC", "PCM_24", 9.99, 2.5),
    (32000, 2, "OGG", "VORBIS", 10.5, 1.0),
])
def test_stream_segments_equal_load_audio_segments(tmp_path, sr, channels, fmt, subtype,
                                                   seconds, block_seconds):
    path = tmp_path / f"s.{fmt.lower()}"
    noise_file(path, sr, seconds, channels, fmt, subtype)
    whole = segment_audio(load_audio(path))
    segs = list(stream_segments(path, block_seconds=block_seconds))
    assert len(segs) == len(whole) == probe_audio(path).num_segments
    for got, want in zip(segs, whole):
        assert got.shape == (SEGMENT_SAMPLES,) and got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
    assert len({id(s) for s in segs}) == len(segs)  # fresh arrays, not one reused buffer


@pytest.mark.parametrize("sr, channels, seconds, block_seconds", [
    (44100, 2, 13.7, 10.0),
    (44100, 2, 13.7, 1.2345),
    (22050, 1, 11.3, 10.0),
    (22050, 1, 11.3, 0.333),
    (48000, 1, 10.0001, 7.0),
    (48000, 2, 10.0001, 10.0),
])
def test_stream_matches_oneshot_soxr(tmp_path, sr, channels, seconds, block_seconds):
    # Measured: the stream equals one-shot soxr.resample exactly (max |diff| == 0.0, same
    # length) for every rate and block size tried (python-soxr's resample() is itself a chunked
    # soxr_process). The bound leaves room for a soxr build that rounds differently while
    # staying ~30x below a 16-bit LSB (3e-5).
    path = tmp_path / "s.wav"
    noise_file(path, sr, seconds, channels, subtype="FLOAT")
    ref = oneshot_16k(path)
    loaded = load_audio(path)
    assert len(loaded) == len(ref) == resampled_length(sf.info(path).frames, sr)
    flat = np.concatenate(list(stream_segments(path, block_seconds=block_seconds)))
    assert len(flat) == num_segments(len(ref)) * SEGMENT_SAMPLES
    assert float(np.abs(flat[:len(ref)] - ref).max()) <= 1e-6
    assert not flat[len(ref):].any()  # zero padding only after the real samples
    np.testing.assert_array_equal(flat[:len(loaded)], loaded)


def test_stream_at_16k_is_bit_identical_to_the_file(tmp_path):
    path = tmp_path / "s.wav"
    noise_file(path, SAMPLE_RATE, 17.25, channels=3, subtype="PCM_16")
    ref = oneshot_16k(path)  # no resampling at 16 kHz: just the decoded mix-down
    flat = np.concatenate(list(stream_segments(path, block_seconds=0.9)))
    np.testing.assert_array_equal(flat[:len(ref)], ref)
    np.testing.assert_array_equal(load_audio(path), ref)


@pytest.mark.parametrize("sr, frames, expected", [
    (SAMPLE_RATE, 1, 1),
    (SAMPLE_RATE, SEGMENT_SAMPLES, 1),
    (SAMPLE_RATE, SEGMENT_SAMPLES + 1, 2),
    (44100, 441000, 1),          # exactly 10 s -> 160000 samples, no padded tail
    (44100, 441002, 2),          # 160000.7 -> 160001 samples
    (32000, 320001, 2),          # 160000.5 rounds up
])
def test_stream_segment_count_at_edges(tmp_path, sr, frames, expected):
    path = tmp_path / "e.wav"
    noise_file(path, sr, frames / sr)
    assert sf.info(path).frames == frames
    segs = list(stream_segments(path, block_seconds=3.0))
    assert len(segs) == expected == probe_audio(path).num_segments
    np.testing.assert_array_equal(np.stack(segs), segment_audio(load_audio(path)))


def test_stream_memory_is_bounded_on_a_ten_minute_file(tmp_path, monkeypatch):
    sr, minutes, block_seconds = 22050, 10, 10.0
    path = tmp_path / "long.wav"
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", sr, 1, subtype="PCM_16") as f:
        for _ in range(minutes * 6):  # written 10 s at a time
            f.write((0.1 * rng.standard_normal(sr * 10)).astype(np.float32))
    whole_bytes = minutes * 60 * SAMPLE_RATE * 4  # load_audio's result alone: 38.4 MB

    reads: list[int] = []
    real_read = sf.SoundFile.read

    def counting_read(self, frames=-1, *args, **kwargs):
        reads.append(frames)
        return real_read(self, frames, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", counting_read)
    tracemalloc.start()
    try:
        count = 0
        for seg in stream_segments(path, block_seconds=block_seconds):
            assert seg.shape == (SEGMENT_SAMPLES,)
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == minutes * 6
    assert reads and all(0 < r <= block_seconds * sr for r in reads)  # never "read it all"
    # measured ~3.7 MB: one 10 s block + its resampled chunk + a segment or two
    assert peak < 8e6 and peak < whole_bytes / 4, peak


def test_stream_can_stop_early(tmp_path):
    path = tmp_path / "s.wav"
    noise_file(path, 44100, 25.0)
    it = stream_segments(path)
    first = next(it)
    it.close()  # closes the file; nothing else to clean up
    np.testing.assert_array_equal(first, segment_audio(load_audio(path))[0])


def test_stream_errors(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        stream_segments(tmp_path / "nope.wav")  # checked at the call, before iterating
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 20)
    with pytest.raises(AudioError, match="cannot read audio"):
        stream_segments(text)
    path = tmp_path / "ok.wav"
    noise_file(path, SAMPLE_RATE, 1.0)
    for bad in (0, -1.0, float("nan"), float("inf"), True, "10"):
        with pytest.raises(ValueError):
            stream_segments(path, block_seconds=bad)


def test_stream_nan_is_reported_when_reached(tmp_path):
    sr = 44100
    x = np.full(sr * 25, 0.1, np.float32)
    x[int(sr * 21.5)] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, x, sr, subtype="FLOAT")
    it = stream_segments(path, block_seconds=2.0)
    assert next(it).shape == (SEGMENT_SAMPLES,)  # segments before the bad block still come
    with pytest.raises(AudioError) as info:
        list(it)
    msg = str(info.value)
    assert "NaN" in msg and "21.500 s" in msg and "\n" not in msg and str(path) in msg
    with pytest.raises(AudioError, match="21.500 s"):
        load_audio(path)


# ----------------------------------------------------------------------------- probe


@pytest.mark.parametrize("sr, channels, fmt, subtype, frames", [
    (44100, 2, "FLAC", "PCM_16", 44100 * 12 + 7),
    (16000, 1, "WAV", "PCM_16", 160000),
    (22050, 3, "WAV", "FLOAT", 12345),
    (48000, 1, "WAV", "PCM_24", 2),      # two frames still give one 16 kHz sample
])
def test_probe_audio(tmp_path, sr, channels, fmt, subtype, frames):
    path = tmp_path / f"p.{fmt.lower()}"
    noise_file(path, sr, frames / sr, channels, fmt, subtype)
    info = probe_audio(path)
    assert isinstance(info, AudioInfo)
    assert info == AudioInfo(path=str(path), sample_rate=sr, channels=channels, frames=frames)
    assert info.duration_s == pytest.approx(frames / sr)
    n = len(load_audio(path))
    assert info.samples_16k == n
    assert info.num_segments == num_segments(n) == len(list(stream_segments(path)))
    with pytest.raises(AttributeError):
        info.frames = 0  # frozen


def test_resampled_length_matches_soxr():
    rng = np.random.default_rng(0)
    for sr in (44100, 22050, 48000, 8000, 11025, 32000, 7999, 96000):
        for n in [1, 2, 3, 5, 7, 100, 1001, *rng.integers(1, 200000, 4)]:
            got = len(soxr.resample(np.zeros(int(n), np.float32), sr, SAMPLE_RATE, "HQ"))
            assert resampled_length(int(n), sr) == got, (sr, n)
    assert resampled_length(12345, SAMPLE_RATE) == 12345


def _probe_error(path) -> str:
    with pytest.raises(AudioError) as info:
        probe_audio(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    assert info.value.__cause__ is None  # no chained soundfile traceback
    return msg


def test_probe_audio_errors(tmp_path):
    assert "not found" in _probe_error(tmp_path / "nope.wav")
    assert "directory" in _probe_error(tmp_path)
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 20)
    msg = _probe_error(text)
    assert "cannot read audio" in msg and "WAV, FLAC, OGG or MP3" in msg
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    assert "empty" in _probe_error(empty)
    zero = tmp_path / "zero.wav"
    sf.write(zero, np.zeros((0, 1)), SAMPLE_RATE)
    assert "empty" in _probe_error(zero)
    src = tmp_path / "ok.wav"
    sf.write(src, sine(440, SAMPLE_RATE, 0.1), SAMPLE_RATE)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(src.read_bytes()[:20])
    _probe_error(cut)
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(1), 44100)  # 1 frame at 44.1 kHz -> 0 samples at 16 kHz
    assert "too short" in _probe_error(short)
    with pytest.raises(AudioError, match="too short"):
        load_audio(short)


# ----------------------------------------------------------------------------- in-memory segments


@pytest.mark.parametrize("n", [0, 5, SEGMENT_SAMPLES, 2 * SEGMENT_SAMPLES + 3])
def test_segments_from_array_matches_segment_audio(n):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    segs = list(segments_from_array(x))
    np.testing.assert_array_equal(np.stack(segs), segment_audio(x))
    segs[0][:] = 7.0  # fresh arrays: writing one leaves the input alone
    assert not (x == 7.0).any()
    with pytest.raises(ValueError):
        segments_from_array(np.zeros((10, 2), np.float32))


def test_batch_segments_over_a_stream(tmp_path):
    path = tmp_path / "s.flac"
    noise_file(path, 44100, 52.0, 2, "FLAC")
    whole = segment_audio(load_audio(path))
    got = list(batch_segments(stream_segments(path, block_seconds=4.5), 2))
    assert [first for first, _ in got] == [0, 2, 4]
    assert [b.shape[0] for _, b in got] == [2, 2, 2]
    np.testing.assert_array_equal(np.concatenate([b for _, b in got]), whole)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError):
            batch_segments(iter([]), bad)
    with pytest.raises(ValueError):
        list(batch_segments([np.zeros(10, np.float32)], 2))


# ----------------------------------------------------------------------------- dev set


def test_devset_audio_loads(devset):
    clips = json.loads((devset / "clips.json").read_text())
    for clip in clips:
        path = devset / clip["audio"]
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


def test_normalise_peak_scales_to_the_peak_and_leaves_silence_alone():
    from pianolm.runtime.audio import normalise_peak

    x = np.array([0.1, -0.4, 0.2], np.float32)
    y = normalise_peak(x, 0.7)
    assert y.dtype == np.float32 and np.isclose(np.max(np.abs(y)), 0.7)
    assert np.allclose(y / x, y[0] / x[0])  # one gain for the whole input
    assert normalise_peak(x, None) is not None and np.array_equal(normalise_peak(x, None), x)
    assert np.array_equal(normalise_peak(np.zeros(5, np.float32), 0.7), np.zeros(5))


def test_streamed_segments_with_a_peak_equal_normalising_the_whole_file(tmp_path):
    """stream_segments(path, peak=p) finds the file's peak first, then streams: its rows are
    exactly segment_audio(normalise_peak(load_audio(path), p)), at 16 kHz and resampled."""
    from pianolm.runtime.audio import file_peak, normalise_peak

    rng = np.random.default_rng(5)
    for rate in (16000, 44100):
        x = (0.3 * rng.normal(size=int(12.5 * rate))).astype(np.float32)
        path = tmp_path / f"clip{rate}.wav"
        sf.write(path, x, rate, subtype="FLOAT")
        whole = load_audio(path)
        assert file_peak(path) == float(np.max(np.abs(whole)))
        want = segment_audio(normalise_peak(whole, 0.7))
        got = np.stack(list(stream_segments(path, block_seconds=3.0, peak=0.7)))
        assert np.array_equal(got, want)
        assert np.isclose(np.max(np.abs(got)), 0.7)
