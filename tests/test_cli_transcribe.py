"""`pianolm transcribe`: outputs where the user asked, the report, and one-line errors that
leave nothing half-written and overwrite nothing without --overwrite."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from pianolm.runtime.cli import main
from pianolm.runtime.midi import read_midi, read_notes_tsv

pytest.importorskip("torch")  # the `exported` fixture builds the tiny model with torch
pytest.importorskip("onnxscript")


def _wav(path, seconds: float, seed: int, rate: int = 16000) -> str:
    rng = np.random.default_rng(seed)
    sf.write(path, (0.1 * rng.normal(size=int(seconds * rate))).astype(np.float32), rate)
    return str(path)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["transcribe", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pianolm: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_one_file_midi_notes_and_report(exported, tmp_path, capsys):
    audio = _wav(tmp_path / "a.wav", 12.0, 0)
    out = tmp_path / "out" / "a.mid"
    code, stdout, err = _run(capsys, audio, "-o", str(out), "--model", str(exported.dirs["hier"]),
                             "--notes", "tsv", "--report-json", str(tmp_path / "r.json"))
    assert code == 0, err
    notes = read_notes_tsv(out.with_suffix(".tsv"))
    midi = read_midi(out)
    assert [(n.pitch, n.velocity) for n in midi] == [(n.pitch, n.velocity) for n in notes]
    times = [t for n in midi for t in (n.onset, n.offset)]
    assert times == pytest.approx([t for n in notes for t in (n.onset, n.offset)], abs=0.006)
    assert "real-time factor" in stdout and f"-> {out}" in stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["files"] == 1 and report["notes"] == len(notes)
    assert report["audio_s"] == pytest.approx(12.0)
    assert set(report["stages"]) == {"onset", "velocity", "offset"}
    assert report["concurrent"] is False  # auto, CPU, no --threads: sessions share every core


def test_schedule_option_sets_the_velocity_offset_schedule(exported, tmp_path, capsys):
    audio = _wav(tmp_path / "a.wav", 4.0, 0)
    for schedule, concurrent in (("concurrent", True), ("sequential", False)):
        report = tmp_path / f"{schedule}.json"
        code, _, err = _run(capsys, audio, "-o", str(tmp_path / f"{schedule}.mid"), "--model",
                            str(exported.dirs["hier"]), "--schedule", schedule,
                            "--report-json", str(report))
        assert code == 0, err
        assert json.loads(report.read_text())["concurrent"] is concurrent


def test_several_files_go_to_a_folder_or_beside_the_inputs(exported, tmp_path, capsys):
    inputs = [_wav(tmp_path / f"{name}.wav", s, k)
              for k, (name, s) in enumerate([("x", 3.0), ("y", 14.0), ("z", 21.0)])]
    model = str(exported.dirs["hier"])
    code, _, err = _run(capsys, *inputs, "-o", str(tmp_path / "midi"), "--model", model,
                        "--batch", "4")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "midi").iterdir()) == ["x.mid", "y.mid", "z.mid"]
    code, _, err = _run(capsys, *inputs, "--model", model)
    assert code == 0, err
    for name in "xyz":  # beside the inputs, same notes at batch 1 as at batch 4
        assert read_midi(tmp_path / f"{name}.mid") == read_midi(tmp_path / "midi" / f"{name}.mid")


def test_existing_output_is_not_overwritten_without_asking(exported, tmp_path, capsys):
    audio = _wav(tmp_path / "a.wav", 2.0, 1)
    out = tmp_path / "a.mid"
    out.write_bytes(b"precious")
    model = str(exported.dirs["hier"])
    code, _, err = _run(capsys, audio, "--model", model)
    assert code == 2 and "--overwrite" in _one_error_line(err)
    assert out.read_bytes() == b"precious"
    code, _, err = _run(capsys, audio, "--model", model, "--overwrite")
    assert code == 0, err
    read_midi(out)


@pytest.mark.parametrize("problem", ["missing", "not_audio", "empty", "directory"])
def test_bad_input_is_one_line_and_writes_nothing(exported, tmp_path, capsys, problem):
    good = _wav(tmp_path / "good.wav", 2.0, 2)
    bad = tmp_path / "bad.wav"
    if problem == "not_audio":
        bad.write_text("hello")
    elif problem == "empty":
        bad.write_bytes(b"")
    elif problem == "directory":
        bad.mkdir()
    model = str(exported.dirs["hier"])
    # --fail-fast: inputs are all checked before any work; the bad one is the run's one error
    code, _, err = _run(capsys, good, str(bad), "--model", model, "--fail-fast")
    assert code == 2
    assert "bad.wav" in _one_error_line(err)
    assert not list(tmp_path.glob("*.mid"))
    # default: the bad input fails alone (exit 1), the good one is transcribed
    code, _, err = _run(capsys, good, str(bad), "--model", model)
    assert code == 1 and "bad.wav" in err and "Traceback" not in err
    assert [p.name for p in tmp_path.glob("*.mid")] == ["good.mid"]


def test_two_inputs_with_one_output_name_are_refused(tmp_path, capsys):
    a = _wav(tmp_path / "song.wav", 1.0, 3)
    sub = tmp_path / "sub"
    sub.mkdir()
    b = _wav(sub / "song.wav", 1.0, 4)
    code, _, err = _run(capsys, a, b, "-o", str(tmp_path / "out"), "--model", str(tmp_path))
    assert code == 2 and "both be written" in _one_error_line(err)


def test_bad_model_folder_is_one_line(tmp_path, capsys):
    audio = _wav(tmp_path / "a.wav", 1.0, 5)
    code, _, err = _run(capsys, audio, "--model", str(tmp_path / "nowhere"))
    assert code == 2 and "nowhere" in _one_error_line(err)
    assert not (tmp_path / "a.mid").exists()


def test_no_default_model_says_so_through_the_console_script(tmp_path):
    """The installed command, as a user runs it: one line, exit 2, no traceback. (Valid only
    while no default model is shipped; then the same call must transcribe.)"""
    from pianolm.engines import DEFAULT_MODEL_DIR

    audio = _wav(tmp_path / "a.wav", 1.0, 6)
    proc = subprocess.run([sys.executable, "-m", "pianolm.runtime.cli", "transcribe", audio],
                          capture_output=True, text=True, timeout=300)
    if (DEFAULT_MODEL_DIR / "manifest.json").is_file():
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "a.mid").is_file()
    else:
        assert proc.returncode == 2
        assert "no default model" in _one_error_line(proc.stderr)
        assert not (tmp_path / "a.mid").exists()
