"""A generated corpus of bad and edge inputs through `pianolm transcribe` as a subprocess, with
the shipped default model: exit status, exactly one line on stderr (or none), no traceback,
nothing partial or replaced."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pianolm.runtime.cli", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def _tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.5 * np.sin(2 * np.pi * 440 * t) * np.exp(-3 * (t % 1.0))
    return np.repeat(x[:, None], channels, axis=1) if channels > 1 else x


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


BAD = {
    "random.wav": lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000)),
    "text.flac": lambda p: p.write_text("not audio at all\n"),
    "nan.wav": lambda p: sf.write(p, np.where(np.arange(16000) == 8000, np.nan, 0.1),
                                  16000, subtype="FLOAT"),
    "inf.wav": lambda p: sf.write(p, np.where(np.arange(16000) == 10, np.inf, 0.1), 16000,
                                  subtype="DOUBLE"),
    "empty.wav": lambda p: p.write_bytes(b""),
    "zero_frames.wav": lambda p: sf.write(p, np.zeros(0), 16000),
    "truncated.flac": lambda p: (sf.write(p, _tone(3, 16000), 16000),
                                 p.write_bytes(p.read_bytes()[:200])),
}
if "MP3" in sf.available_formats():  # libsndfile >= 1.1; libmpg123 prints its own chatter
    BAD["damaged.mp3"] = lambda p: (sf.write(p, _tone(3, 16000), 16000, format="MP3"),
                                    p.write_bytes(p.read_bytes()[:3000] + bytes(range(256)) * 20
                                                  + p.read_bytes()[3000:]))


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    BAD[name](path)
    before = path.read_bytes()
    r = _cli("transcribe", name, cwd=tmp_path)
    assert r.returncode in (1, 2), r.stderr
    assert name in _one_line(r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no output, no temp file
    assert path.read_bytes() == before


def test_edge_formats_all_transcribe(tmp_path: Path) -> None:
    """8/16/24/32-bit int and 32/64-bit float PCM, 8 to 192 kHz, 1 to 8 channels, silence,
    clipping, 1 sample, 0.1 s, a non-ASCII name: one run, every output written, stderr quiet."""
    files = {"pcm_u8.wav": (_tone(1, 8000), 8000, "PCM_U8"),
             "pcm16_44k.wav": (_tone(1.5, 44100, 2), 44100, "PCM_16"),
             "pcm24_96k.wav": (_tone(1, 96000, 3), 96000, "PCM_24"),
             "pcm32_192k.wav": (_tone(0.5, 192000), 192000, "PCM_32"),
             "float_8ch.wav": (_tone(1, 22050, 8), 22050, "FLOAT"),
             "double.wav": (_tone(1, 16000), 16000, "DOUBLE"),
             "silence.flac": (np.zeros(16000), 16000, "PCM_16"),
             "clipped.wav": (np.clip(4 * _tone(1, 16000), -1, 1), 16000, "PCM_16"),
             "one_sample.wav": (np.full(1, 0.3), 16000, "FLOAT"),
             "tenth.ogg": (_tone(0.1, 16000), 16000, "VORBIS"),
             "flügel_ピアノ.wav": (_tone(1, 16000), 16000, "PCM_16")}
    for name, (x, rate, subtype) in files.items():
        sf.write(tmp_path / name, x, rate, subtype=subtype)
    r = _cli("transcribe", *files, "-o", "out", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        Path(n).with_suffix(".mid").name for n in files)


def test_one_bad_input_among_good_ones(tmp_path: Path) -> None:
    for name in ("a.wav", "c.wav"):
        sf.write(tmp_path / name, _tone(1, 16000), 16000)
    BAD["nan.wav"](tmp_path / "b.wav")
    r = _cli("transcribe", "a.wav", "b.wav", "c.wav", "-o", "out", cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 2 and "b.wav" in lines[0] and "1 of 3 inputs failed" in lines[1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.mid", "c.mid"]
    # a re-run needs no --overwrite; --fail-fast stops at the bad one (exit 2)
    r = _cli("transcribe", "a.wav", "c.wav", "-o", "out", "--skip-existing", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "" and r.stdout.count("skipped") == 2, r.stderr
    r = _cli("transcribe", "b.wav", "a.wav", "-o", "out2", "--fail-fast", cwd=tmp_path)
    assert r.returncode == 2 and "b.wav" in _one_line(r.stderr)
    assert not (tmp_path / "out2").exists()


def test_outputs_checked_before_work(tmp_path: Path) -> None:
    sf.write(tmp_path / "a.wav", _tone(1, 16000), 16000)
    before = (tmp_path / "a.wav").read_bytes()
    r = _cli("transcribe", "a.wav", "-o", "a.wav", "--overwrite", cwd=tmp_path)
    assert r.returncode == 2 and "is an input" in _one_line(r.stderr)
    assert (tmp_path / "a.wav").read_bytes() == before
    (tmp_path / "plain").write_text("a file, not a folder\n")
    r = _cli("transcribe", "a.wav", "--report-json", "plain/r.json", cwd=tmp_path)
    assert r.returncode == 2 and "plain/r.json" in _one_line(r.stderr)
    assert not (tmp_path / "a.mid").exists()  # refused before any work
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            return  # root writes anywhere: the read-only case cannot happen here
        r = _cli("transcribe", "a.wav", "--report-json", "locked/r.json", cwd=tmp_path)
        assert r.returncode == 2 and "locked/r.json" in _one_line(r.stderr)
        assert not (tmp_path / "a.mid").exists()
    finally:
        locked.chmod(0o700)


def test_truncated_wav_warns_once_and_writes_the_notes(tmp_path: Path) -> None:
    sf.write(tmp_path / "t.wav", _tone(12, 16000), 16000, subtype="PCM_16")
    data = (tmp_path / "t.wav").read_bytes()
    (tmp_path / "t.wav").write_bytes(data[: len(data) // 2])
    r = _cli("transcribe", "t.wav", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "truncated" in _one_line(r.stderr) and (tmp_path / "t.mid").stat().st_size > 0


def test_corrupt_or_missing_graph(tmp_path: Path) -> None:
    from pianolm.engines import DEFAULT_MODEL_DIR

    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model)
    sf.write(tmp_path / "a.wav", _tone(1, 16000), 16000)
    (model / "onset_step.onnx").unlink()  # the rolls decoder never needs it
    r = _cli("transcribe", "a.wav", "--model", "model", "--decoder", "rolls", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _cli("transcribe", "a.wav", "--model", "model", "--decoder", "lm", "--overwrite",
             cwd=tmp_path)
    assert r.returncode == 2 and "onset_step.onnx: missing" in _one_line(r.stderr)
    enc = bytearray((model / "encoder.onnx").read_bytes())
    enc[len(enc) // 2: len(enc) // 2 + 64] = bytes(64)  # same size, flipped region
    (model / "encoder.onnx").write_bytes(bytes(enc))
    r = _cli("transcribe", "a.wav", "--model", "model", "--decoder", "rolls", "--overwrite",
             cwd=tmp_path)
    assert r.returncode == 2 and "encoder.onnx: sha256 differs" in _one_line(r.stderr)


def test_broken_pipe_and_version(tmp_path: Path) -> None:
    r = subprocess.run(f"{sys.executable} -m pianolm.runtime.cli transcribe --help | head -1",
                       shell=True, capture_output=True, text=True, cwd=tmp_path)
    assert r.stderr == "" and r.stdout.startswith("usage:")
    r = _cli("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("pianolm ")
