"""`pianolm bench --model DIR` (export/bench/folder.py): behaviour, never timings.

- on a rolls-only import (the session's `kong_model`, random Kong weights) and a tiny dev set
  of synthetic clips: the JSON holds the encoder, roll-decoding and whole-transcription phases
  with positive medians, the machine, versions and commit, and each clip's notes are those
  `pianolm transcribe` writes for the same file;
- on the shipped model (LM stages): the LM decode is timed beside them;
- the one-line errors (exit 2): `--decoder lm` on a rolls-only folder, a missing or non-model
  folder, preset options mixed with `--model`, a missing dev set.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pianolm.export.bench import main_bench
from pianolm.runtime.cli import main
from pianolm.runtime.midi import write_notes_tsv
from pianolm.runtime.notes import Note
from tests.struck_tones import struck_tones

CLIP_SECONDS = (3.0, 4.5)


@pytest.fixture
def tiny_devset(tmp_path: Path) -> Path:
    """Two short clips of struck tones, each with a reference TSV (find_clips needs one)."""
    folder = tmp_path / "devset"
    folder.mkdir()
    for k, seconds in enumerate(CLIP_SECONDS):
        sf.write(folder / f"clip{k}.wav", struck_tones(seconds, k, harmonics=(1, 2, 3)), 16000,
                 subtype="PCM_16")
        write_notes_tsv([Note(0.2, 0.6, 60, 80)], folder / f"clip{k}.tsv")
    return folder


def bench(model: Path, devset: Path, out: Path, *extra: str) -> int:
    return main_bench(["--model", str(model), "--devset", str(devset), "--threads", "1",
                       "--repeats", "1", "--warmup", "0", "--out", str(out), *extra])


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def assert_positive_phases(phases: dict, names: tuple[str, ...]) -> None:
    for name in names:
        assert phases[name]["median"] > 0 and phases[name]["n"] >= 1, (name, phases[name])


def test_rolls_only_model_is_timed_phase_by_phase(kong_model, tiny_devset, tmp_path, capsys):
    _, model = kong_model
    out = tmp_path / "bench.json"
    assert bench(model, tiny_devset, out, "--backend", "ort") == 0
    assert f"wrote {out}" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "bench_model"
    assert doc["machine"]["cores"] and doc["versions"]["onnxruntime"] and "git" in doc
    result = doc["result"]
    assert result["model"]["stages"] == [] and result["model"]["roll_method"] == "kong"
    assert result["clips"] == ["clip0", "clip1"]
    entry = result["backends"]["cpu"]  # --backend ort is the runtime's cpu backend
    assert entry["status"] == "ok" and list(entry["decoders"]) == ["rolls"]
    phases = entry["phases"]
    assert_positive_phases(phases, ("encoder_ms_per_segment", "roll_decode_ms_per_segment",
                                    "transcribe_real_time_factor"))
    assert "lm_decode_ms_per_segment" not in phases and phases["transcribe_decoder"] == "rolls"
    rolls = entry["decoders"]["rolls"]
    assert rolls["identical_across_rounds"] and rolls["notes"] > 0 and rolls["pedals"] >= 0
    assert rolls["report"]["decoder"] == "rolls" and rolls["segments"] >= len(CLIP_SECONDS)

    # what was timed is what `pianolm transcribe` gives for the same files
    audio = [str(tiny_devset / f"{c}.wav") for c in result["clips"]]
    assert main(["transcribe", *audio, "--model", str(model), "-o", str(tmp_path / "midi"),
                 "--notes", "tsv", "--threads", "1"]) == 0
    for clip in rolls["clips"]:
        tsv = (tmp_path / "midi" / f"{clip['name']}.tsv").read_bytes()
        assert hashlib.sha256(tsv).hexdigest() == clip["notes_tsv_sha256"], clip["name"]


def test_a_model_with_lm_stages_also_times_the_lm_decode(tiny_devset, tmp_path):
    from pianolm.engines import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "manifest.json").is_file():
        pytest.skip("no shipped model in engines/default")
    devset = tmp_path / "one"
    devset.mkdir()
    for suffix in (".wav", ".tsv"):  # one clip is enough
        (devset / f"clip0{suffix}").write_bytes((tiny_devset / f"clip0{suffix}").read_bytes())
    out = tmp_path / "bench.json"
    assert bench(DEFAULT_MODEL_DIR, devset, out) == 0
    entry = json.loads(out.read_text())["result"]["backends"]["cpu"]
    assert sorted(entry["decoders"]) == ["lm", "rolls"]
    assert_positive_phases(entry["phases"], ("encoder_ms_per_segment",
                                             "lm_decode_ms_per_segment",
                                             "transcribe_real_time_factor"))
    assert entry["phases"]["roll_decode_ms_per_segment"]["median"] >= 0
    assert entry["decoders"]["lm"]["report"]["stages"]  # per-stage step latencies


def test_lm_decoder_on_a_rolls_only_model_is_one_line(kong_model, tiny_devset, tmp_path,
                                                      capsys):
    _, model = kong_model
    out = tmp_path / "bench.json"
    assert bench(model, tiny_devset, out, "--decoder", "lm") == 2
    err = one_error_line(capsys)
    assert "rolls-only" in err and "--decoder rolls" in err and not out.exists()


@pytest.mark.parametrize("make", ["missing", "not_a_model"])
def test_a_missing_or_non_model_folder_is_one_line(make, tiny_devset, tmp_path, capsys):
    folder = tmp_path / "folder"
    if make == "not_a_model":
        folder.mkdir()
        (folder / "notes.txt").write_text("not a model")
    assert bench(folder, tiny_devset, tmp_path / "bench.json") == 2
    assert str(folder) in one_error_line(capsys)
    assert not (tmp_path / "bench.json").exists()


def test_preset_options_with_model_are_refused(tmp_path, capsys):
    assert main_bench(["--model", str(tmp_path), "--presets", "tiny", "--quick"]) == 2
    err = one_error_line(capsys)
    assert "--presets" in err and "--quick" in err and "--model" in err


def test_a_missing_devset_is_one_line(kong_model, tmp_path, capsys):
    _, model = kong_model
    assert bench(model, tmp_path / "absent", tmp_path / "bench.json") == 2
    assert str(tmp_path / "absent") in one_error_line(capsys)


def test_an_unreadable_clip_is_one_line(kong_model, tiny_devset, tmp_path, capsys):
    _, model = kong_model
    (tiny_devset / "clip1.wav").write_bytes(np.zeros(64, np.uint8).tobytes())
    assert bench(model, tiny_devset, tmp_path / "bench.json") == 2
    assert "clip1.wav" in one_error_line(capsys)
