"""`pianolm import kong` end to end: Kong et al.'s checkpoint (random weights in the Zenodo
layout) -> a rolls-only model folder -> `pianolm transcribe` gives the notes and pedals of
Kong's own tool (piano_transcription_inference 0.0.6) on the same 16 kHz audio.

The weights are random (no published file is at hand), with BatchNorm variances drawn small, so
a missing eps fold or a wrong front-end shows; what is compared is the whole path: conversion,
the ONNX encoder graph, Kong's segmenting and his post-processor. Kong's tool reads a file of
at least 1.6e8 bytes (smaller: it downloads), which the full random weights are.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pianolm.export.importing import main_import
from pianolm.runtime.cli import main
from pianolm.runtime.manifest import load_manifest
from pianolm.runtime.metrics import count_matched
from pianolm.runtime.notes import Note, Pedal

# The targets: notes matched within 5 ms, same pitch, velocity within 1 (>= 99 %), pedals
# within 5 ms (>= 95 %)
TOLERANCE_S = 0.005
CLIPS = ("dev_05.wav", "dev_06.wav")  # 16 kHz mono, with pedal in the references


def test_import_writes_a_rolls_only_model_with_pedal(kong_model):
    checkpoint, model = kong_model
    m = load_manifest(model)
    assert m.rolls_only and m.default_decoder == "rolls" and m.segmenting == "kong"
    assert m.encoder.rolls.pedal and m.encoder.rolls.thresholds.method == "kong"
    assert m.source.checkpoint == str(checkpoint) and m.source.sha256
    assert m.source.metadata["importer"] == "kong"


def test_lm_decoder_is_refused_in_one_line(kong_model, tmp_path, capsys):
    _, model = kong_model
    audio = tmp_path / "a.wav"
    sf.write(audio, np.zeros(16000, np.float32), 16000)
    assert main(["transcribe", str(audio), "--model", str(model), "--decoder", "lm"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no LM stages" in err and "--decoder rolls" in err
    assert not audio.with_suffix(".mid").exists()


def test_import_never_overwrites_what_it_was_not_told_to(kong_model, tmp_path, capsys):
    checkpoint, _ = kong_model
    kept = tmp_path / "mine"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert main_import(["kong", str(checkpoint), "--out", str(kept)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main_import(["kong", str(checkpoint), "--out", str(kept), "--overwrite"]) == 2
    assert "not a pianolm model folder" in capsys.readouterr().err
    assert (kept / "notes.txt").read_text() == "mine"

    # a model folder given with --overwrite stays as it was when the import fails
    import shutil

    old = tmp_path / "old"
    shutil.copytree(kong_model[1], old)
    before = (old / "manifest.json").read_bytes()
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    assert main_import(["kong", str(bad), "--out", str(old), "--overwrite"]) == 2
    assert (old / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth", "mine", "old"]


def test_import_of_a_bad_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "model.pth"
    bad.write_text("not a checkpoint")
    assert main_import(["kong", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err
    assert main_import(["kong", str(tmp_path / "absent.pth"), "--out",
                 str(tmp_path / "out")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()


def _kong_tool(checkpoint: Path, audio: np.ndarray) -> tuple[list[Note], list[Pedal]]:
    """Kong's own PianoTranscription on the CPU: notes and pedals as his tool gives them."""
    inference = pytest.importorskip(
        "piano_transcription_inference",
        reason="Kong's tool is the peers extra: pip install -e '.[peers]'")
    import torch

    tool = inference.PianoTranscription(checkpoint_path=str(checkpoint),
                                        device=torch.device("cpu"))
    out = tool.transcribe(audio, None)
    notes = [Note(float(e["onset_time"]), float(e["offset_time"]), int(e["midi_note"]),
                  int(e["velocity"])) for e in out["est_note_events"]]
    pedals = [(float(e["onset_time"]), float(e["offset_time"]))
              for e in out["est_pedal_events"] or []]
    return notes, pedals


@pytest.mark.parametrize("clip", CLIPS)
def test_transcribe_gives_kongs_notes_and_pedals(kong_model, devset, clip, tmp_path):
    checkpoint, model = kong_model
    audio, rate = sf.read(devset / clip, dtype="float32")
    assert rate == 16000 and audio.ndim == 1
    theirs, their_pedals = _kong_tool(checkpoint, audio)

    midi = tmp_path / "out.mid"
    assert main(["transcribe", str(devset / clip), "--model", str(model), "-o", str(midi),
                 "--notes", "json", "--threads", "1"]) == 0
    doc = json.loads(midi.with_suffix(".json").read_text())
    ours = [Note(n["onset"], n["offset"], n["pitch"], n["velocity"]) for n in doc["notes"]]
    our_pedals = [(p["onset"], p["offset"]) for p in doc["pedals"]]

    assert len(theirs) >= 20, "random weights gave Kong's tool too few notes to compare"
    assert count_matched(ours, theirs, TOLERANCE_S) >= 0.99 * len(theirs), (len(ours), len(theirs))
    assert abs(len(ours) - len(theirs)) <= 0.01 * len(theirs)
    pedal_hits = sum(any(abs(d - pd) <= TOLERANCE_S and abs(u - pu) <= TOLERANCE_S
                         for pd, pu in our_pedals) for d, u in their_pedals)
    assert pedal_hits >= 0.95 * len(their_pedals) and len(our_pedals) == len(their_pedals)


def test_eval_scores_notes_and_pedals_of_a_rolls_only_model(kong_model, devset, tmp_path,
                                                            capsys):
    """`pianolm eval` on an imported model: its roll notes (the LM column empty) and, where a
    clip's MIDI reference has CC64, its pedal presses. The dev set's MIDI files hold no CC64
    (their pedal is in the extended offsets), so one clip gets a reference with pedal."""
    import shutil

    from pianolm.runtime.midi import read_notes_tsv, write_midi

    _, model = kong_model
    data = tmp_path / "data"
    data.mkdir()
    for stem in ("dev_04", "dev_05"):
        shutil.copy(devset / f"{stem}.wav", data)
    shutil.copy(devset / "dev_04.tsv", data)  # notes only: no pedal scored
    write_midi(read_notes_tsv(devset / "dev_05.tsv"), data / "dev_05.mid",
               pedals=[(0.5, 2.0), (2.5, 4.25), (6.0, 9.0)])
    out = tmp_path / "eval.json"
    assert main(["eval", "--data", str(data), "--model", str(model), "--threads", "1",
                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["mean"]["lm"] is None and doc["mean"]["rolls"]["n_pred"] > 0
    pedal = {c["name"]: c["pedal"] for c in doc["clips"]}
    assert pedal["dev_04"] is None and pedal["dev_05"]["pedal_n_ref"] == 3
    assert pedal["dev_05"]["pedal_n_pred"] > 0 and doc["mean_pedal"] == pedal["dev_05"]
    assert "pedal, 1 clip(s) with CC64 references: onset F1" in capsys.readouterr().out
