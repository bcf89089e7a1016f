"""Identical work for every backend: 10 s windows of the dev set's reference notes, as tokens.

Each clip's reference notes (`<stem>.tsv`) are cut into 10 s windows (every `stride` seconds);
windows are ranked by their own notes (onsets inside the window), densest first. A batch of B
rows takes the B densest windows (cycling when there are fewer). A window becomes segment 1 of
a two-segment stretch: notes still sounding from the 10 s before it are its carried notes, as
the decode loop sees them mid-file.

Per stage, the codec (runtime/tokens.py `encode`) turns the window's notes into the sequence a
trained model would produce; its loss mask says which tokens the decoder predicts: the onset
stage every token after `sos task` (2 per note, then eos), the velocity and offset stages one
per note (each fed as a 3-token chunk), the flattened baseline 4 per note and eos. Those
predicted tokens are what `forcing.py` makes the decode loop choose.

The notes are made grammar-clean first (runtime/grammar.py): one note per (tick, key), a note
ends no later than the next onset of its key. Reference data rarely breaks either rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pianolm.runtime import vocab as V
from pianolm.runtime.decode import OpenNote, RowSpec
from pianolm.runtime.midi import read_notes_tsv
from pianolm.runtime.notes import Note
from pianolm.runtime.tokens import SegmentNotes, TickNote, encode, quantize, segment_notes

SAMPLE_RATE = 16000
SEGMENT_SAMPLES = int(SAMPLE_RATE * V.SEGMENT_SECONDS)
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
HIERARCHICAL = ("onset", "velocity", "offset")


class WorkloadError(ValueError):
    """The dev set folder cannot give a workload (missing, or no notes in it)."""


@dataclass(frozen=True)
class Window:
    """A 10 s window of one clip's reference notes."""

    clip: str  # the reference file's stem
    start_s: float
    notes: int  # own notes: onsets inside the window
    carried: int  # notes sounding at the window's start, begun before it


@dataclass
class Row:
    """One batch row: a window as the decode loop and the codec see it."""

    window: Window
    segment: SegmentNotes  # segment 1: own notes, and carried ones owned by segment 0
    audio: np.ndarray  # float32 [160000]: the window's audio, or noise when the clip has none
    tokens: dict[str, list[int]] = field(default_factory=dict)  # stage -> codec sequence
    targets: dict[str, list[int]] = field(default_factory=dict)  # stage -> predicted tokens

    @property
    def spec(self) -> RowSpec:
        """The decode loop's view: carried notes come in, owned by the previous segment."""
        owner = self.segment.index - 1
        return RowSpec(self.segment.index, None,
                       [OpenNote(-owner, n.pitch) for n in self.segment.carried])

    @property
    def own_notes(self) -> int:
        return len(self.segment.own)


@dataclass
class Clip:
    name: str
    notes: list[Note]
    audio_path: Path | None


def load_clips(folder: Path) -> list[Clip]:
    """Every `<stem>.tsv` in `folder`, with the audio file of the same stem if there is one."""
    if not folder.is_dir():
        raise WorkloadError(f"{folder}: no dev set folder (pass --devset or set "
                            f"$PIANOLM_DEVSET)")
    clips = []
    for tsv in sorted(folder.glob("*.tsv")):
        audio = next((p for s in AUDIO_SUFFIXES if (p := tsv.with_suffix(s)).is_file()), None)
        clips.append(Clip(tsv.stem, read_notes_tsv(tsv), audio))
    if not clips:
        raise WorkloadError(f"{folder}: no reference notes (*.tsv)")
    return clips


def rank_windows(clips: list[Clip], stride_s: float = 0.5) -> list[Window]:
    """Every window start (a multiple of `stride_s`, the window inside the clip's notes),
    densest first; ties by clip name and start."""
    windows = []
    for clip in clips:
        if not clip.notes:
            continue
        onsets = np.array([n.onset for n in clip.notes])
        end = max(n.offset for n in clip.notes)
        last_start = max(0.0, end - V.SEGMENT_SECONDS)
        for start in np.arange(0.0, last_start + 1e-9, stride_s):
            stop = start + V.SEGMENT_SECONDS
            own = int(((onsets >= start) & (onsets < stop)).sum())
            carried = sum(1 for n in clip.notes if n.onset < start < n.offset)
            windows.append(Window(clip.name, round(float(start), 3), own, carried))
    windows.sort(key=lambda w: (-w.notes, w.clip, w.start_s))
    return windows


def clean_notes(notes: list[TickNote]) -> list[TickNote]:
    """Grammar-clean notes: one per (onset tick, key); each ends by the next onset of its key."""
    by_key: dict[int, list[TickNote]] = {}
    for n in sorted(notes, key=lambda n: (n.pitch, n.onset_tick, n.offset_tick)):
        same = by_key.setdefault(n.pitch, [])
        if same and same[-1].onset_tick == n.onset_tick:
            continue
        if same and same[-1].offset_tick > n.onset_tick:
            prev = same[-1]
            same[-1] = TickNote(prev.onset_tick, n.onset_tick, prev.pitch, prev.velocity)
        same.append(n)
    return sorted((n for same in by_key.values() for n in same),
                  key=lambda n: (n.onset_tick, n.pitch))


def window_segment(notes: list[Note], start_s: float) -> SegmentNotes:
    """The window [start, start + 10 s) as segment 1 (notes begun up to 10 s before it are
    carried notes of segment 0; older ones are clipped to its start)."""
    shift = V.SEGMENT_SECONDS - start_s
    stop = start_s + V.SEGMENT_SECONDS
    inside = [Note(n.onset + shift, n.offset + shift, n.pitch, n.velocity) for n in notes
              if n.onset < stop and n.offset > start_s]
    return segment_notes(clean_notes(quantize(inside)), n_segments=2)[1]


def stage_tokens(segment: SegmentNotes, stage: str) -> tuple[list[int], list[int]]:
    """(the codec's whole sequence, the tokens the decoder predicts) for one stage."""
    tokens, predicted = encode(stage, segment)
    return tokens, [t for t, p in zip(tokens, predicted) if p]


def _audio(clip: Clip, start_s: float, cache: dict[str, np.ndarray], seed: int) -> np.ndarray:
    if clip.audio_path is None:  # notes without audio (a test slice): the encoder costs the same
        rng = np.random.default_rng(seed)
        return (0.05 * rng.standard_normal(SEGMENT_SAMPLES)).astype(np.float32)
    if clip.name not in cache:
        from pianolm.runtime.audio import load_audio

        cache[clip.name] = load_audio(clip.audio_path)
    audio = cache[clip.name]
    first = int(round(start_s * SAMPLE_RATE))
    out = np.zeros(SEGMENT_SAMPLES, np.float32)
    piece = audio[first:first + SEGMENT_SAMPLES]
    out[:len(piece)] = piece
    return out


@dataclass
class Workload:
    """The dev set's windows, densest first, and the rows a batch of B takes."""

    clips: list[Clip]
    windows: list[Window]
    _audio: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _rows: dict[Window, Row] = field(default_factory=dict, repr=False)

    @classmethod
    def from_devset(cls, folder: Path, stride_s: float = 0.5) -> Workload:
        clips = load_clips(folder)
        windows = rank_windows(clips, stride_s)
        if not windows:
            raise WorkloadError(f"{folder}: the reference notes hold no notes")
        return cls(clips, windows)

    def row(self, window: Window) -> Row:
        if window not in self._rows:
            clip = next(c for c in self.clips if c.name == window.clip)
            seg = window_segment(clip.notes, window.start_s)
            row = Row(window, seg, _audio(clip, window.start_s, self._audio,
                                          seed=len(self._rows)))
            for stage in (*HIERARCHICAL, "flat"):
                row.tokens[stage], row.targets[stage] = stage_tokens(seg, stage)
            self._rows[window] = row
        return self._rows[window]

    def rows(self, batch: int) -> list[Row]:
        """The `batch` densest windows (cycling through them when there are fewer)."""
        return [self.row(self.windows[i % len(self.windows)]) for i in range(batch)]

    def describe(self, target_notes: int) -> dict:
        best = self.windows[0]
        reached = best.notes >= target_notes
        return {
            "clips": [c.name for c in self.clips],
            "windows": len(self.windows),
            "densest": {"clip": best.clip, "start_s": best.start_s, "notes": best.notes,
                        "carried": best.carried},
            "target_notes": target_notes,
            "target_reached": reached,
            "note": (f"densest 10 s window has {best.notes} notes (>= {target_notes})" if reached
                     else f"the dev set's densest 10 s window has {best.notes} notes, below the "
                          f"issue's {target_notes}: every figure is for {best.notes} notes"),
            "top": [{"clip": w.clip, "start_s": w.start_s, "notes": w.notes,
                     "carried": w.carried} for w in self.windows[:8]],
        }


def row_counts(rows: list[Row], mode: str) -> dict[str, int]:
    """What a batch of rows asks of the decoders: notes, predicted tokens, decoder calls."""
    stages = HIERARCHICAL if mode == "hierarchical" else ("flat",)
    predicted = sum(len(r.targets[s]) for r in rows for s in stages)
    # Rows of a batch share decoder calls: a batch makes as many as its longest row. The onset
    # and flat prompts yield the first prediction; the velocity and offset prompts yield none.
    calls = {s: max(len(r.targets[s]) for r in rows) + (s in ("velocity", "offset"))
             for s in stages}
    return {"rows": len(rows), "notes": sum(r.own_notes for r in rows),
            "carried": sum(len(r.segment.carried) for r in rows),
            "predicted_tokens": predicted, "calls": sum(calls.values()),
            "critical_path_calls": (calls["onset"] + max(calls["velocity"], calls["offset"])
                                    if mode == "hierarchical" else calls["flat"])}
