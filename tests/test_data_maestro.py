"""MAESTRO v3 loader on a tiny fake MAESTRO folder (CSV and JSON metadata, WAV + MIDI)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import soundfile as sf

from pianolm.export.data import maestro as M
from pianolm.export.data.render import render_midi
from pianolm.runtime.notes import Note

ROWS = [
    ("Johann Sebastian Bach", "Prelude in C", "train", 2018, [Note(0.5, 1.0, 60, 70)],
     [(0.4, 1.6)]),
    ("Frédéric Chopin", "Nocturne, Op. 9 No. 2", "validation", 2017,
     [Note(0.25, 0.75, 64, 50), Note(0.5, 1.5, 67, 90)], []),
    ("Alban Berg", "Sonata Op. 1", "test", 2004, [Note(1.0, 1.25, 72, 100)], [(0.0, 0.5)]),
]


def make_fake_maestro(root, fmt: str = "csv"):
    cols = {c: {} for c in M.COLUMNS}
    for i, (composer, title, split, year, notes, pedal) in enumerate(ROWS):
        stem = f"{year}/MIDI-Unprocessed_{i:02d}_R1_{year}_wav--{i + 1}"
        (root / str(year)).mkdir(parents=True, exist_ok=True)
        render_midi(notes, pedal, duration=2.0).save(root / f"{stem}.midi")
        sf.write(root / f"{stem}.wav", np.zeros((2 * 44100, 2), np.float32), 44100)
        row = {"canonical_composer": composer, "canonical_title": title, "split": split,
               "year": year, "midi_filename": f"{stem}.midi", "audio_filename": f"{stem}.wav",
               "duration": 2.0}
        for c in M.COLUMNS:
            cols[c][str(i)] = row[c]
    if fmt == "csv":
        with open(root / "maestro-v3.0.0.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=M.COLUMNS)
            w.writeheader()
            for i in range(len(ROWS)):
                w.writerow({c: cols[c][str(i)] for c in M.COLUMNS})
    else:
        (root / "maestro-v3.0.0.json").write_text(json.dumps(cols), encoding="utf-8")
    return root


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_loader_reads_metadata_midi_and_pedal(tmp_path, fmt):
    root = make_fake_maestro(tmp_path, fmt)
    recs = M.read_metadata(root)
    assert [r.split for r in recs] == ["train", "validation", "test"]
    assert recs[1].canonical_composer == "Frédéric Chopin" and recs[1].year == 2017
    assert M.split_counts(root) == {"train": 1, "validation": 1, "test": 1}
    for split, (_, _, _, _, notes, pedal) in zip(M.SPLITS, ROWS, strict=True):
        items = list(M.iter_maestro(root, split))
        assert len(items) == 1
        item = items[0]
        assert item.audio_path.is_file() and item.audio_path.suffix == ".wav"
        assert [(n.pitch, n.velocity) for n in item.notes] == [(n.pitch, n.velocity)
                                                                 for n in notes]
        for got, want in zip(item.notes, notes, strict=True):
            assert abs(got.onset - want.onset) < 1e-3 and abs(got.offset - want.offset) < 1e-3
        assert len(item.pedal) == len(pedal)
        for (d, u), (d0, u0) in zip(item.pedal, pedal, strict=True):
            assert abs(d - d0) < 1e-3 and abs(u - u0) < 1e-3
    assert len(list(M.iter_maestro(root))) == 3


def test_audio_loads_through_the_runtime(tmp_path):
    from pianolm.runtime.audio import load_audio

    root = make_fake_maestro(tmp_path)
    item = next(M.iter_maestro(root, "train"))
    audio = load_audio(item.audio_path)
    assert audio.dtype == np.float32 and audio.ndim == 1 and abs(len(audio) - 32000) <= 1


def test_missing_files_and_bad_folders(tmp_path):
    root = make_fake_maestro(tmp_path)
    rec = M.read_metadata(root)[0]
    rec.audio_path.unlink()
    with pytest.raises(M.MaestroError, match="missing"):
        list(M.iter_maestro(root, "train"))
    assert list(M.iter_maestro(root, "train", missing="skip")) == []
    with pytest.raises(M.MaestroError, match="no maestro"):
        M.read_metadata(tmp_path / "2018")
    with pytest.raises(ValueError):
        list(M.iter_maestro(root, "dev"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "maestro-v3.0.0.csv").write_text("split,year\ntrain,2018\n")
    with pytest.raises(M.MaestroError, match="missing column"):
        M.read_metadata(bad)
