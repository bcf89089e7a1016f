"""MAESTRO v3 loader: its metadata (CSV or JSON) + WAV + MIDI layout.

    for item in iter_maestro("/data/maestro-v3.0.0", split="train"):
        item.audio_path, item.notes, item.pedal      # notes as played, pedal (down, up)

The dataset folder holds `maestro-v3.0.0.csv` and/or `maestro-v3.0.0.json` plus year folders
with the WAV and MIDI files the metadata names. Columns: canonical_composer, canonical_title,
split (train / validation / test), year, midi_filename, audio_filename, duration. The JSON
is column-oriented ({"split": {"0": "train", ...}, ...}); the CSV has one row per recording.
MIDI is read with pianolm.runtime.midi.read_midi_with_pedal (CC64 >= 64 = pedal down).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pianolm.runtime.midi import read_midi_with_pedal
from pianolm.runtime.notes import Note

from .common import Pedal

COLUMNS = ("canonical_composer", "canonical_title", "split", "year", "midi_filename",
           "audio_filename", "duration")
METADATA_NAMES = ("maestro-v3.0.0.csv", "maestro-v3.0.0.json")
SPLITS = ("train", "validation", "test")


class MaestroError(ValueError):
    """A MAESTRO folder that cannot be read; the message names the file."""


@dataclass(frozen=True)
class MaestroRecord:
    canonical_composer: str
    canonical_title: str
    split: str
    year: int
    midi_filename: str
    audio_filename: str
    duration: float
    root: Path

    @property
    def audio_path(self) -> Path:
        return self.root / self.audio_filename

    @property
    def midi_path(self) -> Path:
        return self.root / self.midi_filename


@dataclass
class MaestroItem:
    record: MaestroRecord
    notes: list[Note]
    pedal: list[Pedal]

    @property
    def audio_path(self) -> Path:
        return self.record.audio_path


def find_metadata(root: str | os.PathLike) -> Path:
    """The metadata file of a MAESTRO folder (v3 names first, then any maestro-v*.csv/json)."""
    base = Path(root)
    if base.is_file():
        return base
    for name in METADATA_NAMES:
        if (base / name).is_file():
            return base / name
    others = sorted(base.glob("maestro-v*.csv")) + sorted(base.glob("maestro-v*.json"))
    if others:
        return others[-1]
    raise MaestroError(f"{base}: no maestro-v3.0.0.csv or maestro-v3.0.0.json found")


def _record(row: dict, root: Path, where: str) -> MaestroRecord:
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        raise MaestroError(f"{where}: missing column(s) {', '.join(missing)}")
    try:
        return MaestroRecord(
            str(row["canonical_composer"]), str(row["canonical_title"]),
            str(row["split"]).strip(), int(row["year"]), str(row["midi_filename"]),
            str(row["audio_filename"]), float(row["duration"]), root)
    except (TypeError, ValueError) as e:
        raise MaestroError(f"{where}: bad value ({e})") from None


def read_metadata(root: str | os.PathLike) -> list[MaestroRecord]:
    """All records of a MAESTRO folder (or of a metadata file given directly)."""
    path = find_metadata(root)
    base = path.parent
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return [_record(r, base, f"{path}:{i + 2}") for i, r in enumerate(rows)]
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MaestroError(f"{path}: not readable JSON ({e})") from None
    if isinstance(doc, list):  # a list of row objects
        return [_record(r, base, f"{path}[{i}]") for i, r in enumerate(doc)]
    missing = [c for c in COLUMNS if c not in doc]
    if missing:
        raise MaestroError(f"{path}: missing column(s) {', '.join(missing)}")
    keys = sorted(doc["split"], key=lambda k: int(k) if str(k).isdigit() else str(k))
    return [_record({c: doc[c][k] for c in COLUMNS}, base, f"{path}[{k}]") for k in keys]


def iter_maestro(root: str | os.PathLike, split: str | None = None,
                 missing: str = "error") -> Iterator[MaestroItem]:
    """(record, notes, pedal) for every recording of `split` (all splits if None).

    missing: "error" raises MaestroError for a record whose WAV or MIDI file is absent;
    "skip" leaves such records out (e.g. a partial download).
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if missing not in ("error", "skip"):
        raise ValueError("missing must be 'error' or 'skip'")
    for rec in read_metadata(root):
        if split is not None and rec.split != split:
            continue
        absent = [p for p in (rec.audio_path, rec.midi_path) if not p.is_file()]
        if absent:
            if missing == "skip":
                continue
            raise MaestroError(f"{absent[0]}: file named in the metadata is missing")
        notes, pedal = read_midi_with_pedal(rec.midi_path)
        yield MaestroItem(rec, notes, pedal)


def split_counts(root: str | os.PathLike) -> dict[str, int]:
    counts = dict.fromkeys(SPLITS, 0)
    for rec in read_metadata(root):
        counts[rec.split] = counts.get(rec.split, 0) + 1
    return counts
