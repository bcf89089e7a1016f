"""Where training examples come from, and how they are batched and visited.

Encoder pre-training (encoder.py) reads a rendered dataset (export/data/dataset.py):
`dataset_entries` (its index, one split), `piece_notes` (an item's pedal-extended notes),
`CropSource` (random fixed-length audio crops of any piece) and `make_batch` (crops + their
piano-roll targets, export/train/targets.py).

LM training (lm.py) reads precomputed embeddings (embeddings.py): `build_examples` makes one
`Example` per 10 s segment of every piece and grid shift, its tokens from the piece's notes
through the runtime codec (`clean_ticknotes`, `shifted_segments`); `EmbeddingStore` reads a
segment's embeddings, `collate` pads examples into a teacher-forced `TrainBatch`,
`EpochSampler` visits them in shuffled epochs (its state goes into state.pt) and
`spread_examples` picks a fixed validation subset.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import soundfile as sf
import torch
from torch import Tensor

from pianolm.runtime import vocab as V
from pianolm.runtime.grammar import REPEAT_TICKS, FlatGrammar, OnsetGrammar, offset_mask
from pianolm.runtime.notes import Note
from pianolm.runtime.sustain import extend_by_pedal
from pianolm.runtime.tokens import (
    SegmentNotes,
    TickNote,
    encode,
    quantize,
    segment_notes,
)

from .targets import TargetConfig, roll_targets

if TYPE_CHECKING:  # embeddings.py imports this module
    from .embeddings import EmbeddingItem

SAMPLE_RATE = 16000


# ---------------------------------------------------------------------------------------------
# Encoder: a rendered dataset, random audio crops and their roll targets


def dataset_entries(root: str | os.PathLike, split: str | None = None) -> list[dict]:
    """The index entries of a rendered dataset (export/data/dataset.py), optionally one split.

    Reads index.json; while a render is still running (no index yet) the per-item <id>.json
    files already written stand in for it.
    """
    from pianolm.export.data.dataset import load_index

    root = Path(root)
    if (root / "index.json").is_file():
        items = load_index(root)["items"]
    else:
        items = []
        for path in sorted(root.glob("*/*.json")):
            try:
                entry = json.loads(path.read_text())
            except ValueError:
                continue
            if isinstance(entry, dict) and "audio" in entry and "notes" in entry:
                items.append(entry)
        if not items:
            raise FileNotFoundError(f"{root}: no index.json and no rendered items")
    return [e for e in items if split is None or e["split"] == split]


def piece_notes(root: str | os.PathLike, entry: Mapping) -> list[Note]:
    """An item's notes with pedal-extended offsets (the targets' convention)."""
    from pianolm.export.data.dataset import read_pedal_tsv
    from pianolm.runtime.midi import read_notes_tsv

    base = Path(root)
    notes = read_notes_tsv(base / entry["notes"])
    pedal = read_pedal_tsv(base / entry["pedal"]) if entry.get("pedal") else []
    return extend_by_pedal(notes, pedal)


class CropSource:
    """Random fixed-length crops (audio + notes) from one split of a rendered dataset.

    input_peak: scale each crop by the gain that brings its whole item to this peak, as the
    runtime scales a whole file (the encoder's `input_peak`); None: crops as rendered."""

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 input_peak: float | None = None) -> None:
        self.root = Path(root)
        self.input_peak = input_peak
        self._peak: dict[int, float] = {}
        self.entries = dataset_entries(root, split)
        if not self.entries:
            raise ValueError(f"{root}: no items in split {split!r}")
        self.notes = [piece_notes(root, e) for e in self.entries]
        self._info: dict[int, tuple[int, bool]] = {}
        self._decoded: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _length(self, i: int) -> tuple[int, bool]:
        """(samples, whether it can be read in place: a 16 kHz mono file)."""
        if i not in self._info:
            info = sf.info(str(self.root / self.entries[i]["audio"]))
            direct = info.samplerate == SAMPLE_RATE and info.channels == 1
            n = info.frames if direct else len(self._full(i))
            self._info[i] = (int(n), direct)
        return self._info[i]

    def _full(self, i: int) -> np.ndarray:
        if i not in self._decoded:  # other rates / channels: decode and resample once
            from pianolm.runtime.audio import load_audio

            self._decoded[i] = load_audio(self.root / self.entries[i]["audio"])
        return self._decoded[i]

    def read(self, i: int, start: int, n: int) -> np.ndarray:
        """n samples from `start` (zero-padded past the end)."""
        total, direct = self._length(i)
        stop = min(start + n, total)
        if direct:
            x = sf.read(str(self.root / self.entries[i]["audio"]), start=start, stop=stop,
                        dtype="float32", always_2d=False)[0]
        else:
            x = self._full(i)[start:stop]
        out = np.zeros(n, np.float32)
        out[: len(x)] = x
        return out

    def peak(self, i: int) -> float:
        """The largest |sample| of item i (read once)."""
        if i not in self._peak:
            total, _ = self._length(i)
            self._peak[i] = float(np.max(np.abs(self.read(i, 0, total)))) if total else 0.0
        return self._peak[i]

    def sample(self, rng: np.random.Generator, n_samples: int
               ) -> tuple[np.ndarray, list[Note], float]:
        """A random crop: (audio [n_samples], the piece's notes, crop start in seconds)."""
        i = int(rng.integers(len(self.entries)))
        total, _ = self._length(i)
        start = int(rng.integers(max(total - n_samples, 0) + 1))
        x = self.read(i, start, n_samples)
        if self.input_peak is not None and self.peak(i) > 0:
            x = x * np.float32(self.input_peak / self.peak(i))
        return x, self.notes[i], start / SAMPLE_RATE


def make_batch(source: CropSource, rng: np.random.Generator, batch: int, n_samples: int,
               n_frames: int, target_cfg: TargetConfig, gain_db: float = 0.0
               ) -> tuple[Tensor, dict[str, Tensor]]:
    """(waveforms [B, n_samples], targets {onset, offset, frame, velocity, velocity_mask}:
    [B, n_frames, 88])."""
    audio, targets = [], []
    for _ in range(batch):
        x, notes, start = source.sample(rng, n_samples)
        if gain_db:
            x = x * np.float32(10 ** (rng.uniform(-gain_db, gain_db) / 20))
        audio.append(np.clip(x, -1.0, 1.0))
        targets.append(roll_targets(notes, n_frames, target_cfg, start=start).as_dict())
    return (torch.from_numpy(np.stack(audio)),
            {k: torch.from_numpy(np.stack([t[k] for t in targets])) for k in targets[0]})


# ---------------------------------------------------------------------------------------------
# LM: token segments over precomputed embeddings


def clean_ticknotes(notes: Sequence[TickNote]) -> list[TickNote]:
    """Make notes obey the decode grammar: onsets of one key at least REPEAT_TICKS apart (of
    those closer, the first; at one tick the loudest, then longest), and a note ends no later
    than the next onset of its key."""
    by_key: dict[int, list[TickNote]] = {}
    for n in notes:
        by_key.setdefault(n.pitch, []).append(n)
    out = []
    for key_notes in by_key.values():
        key_notes.sort(key=lambda n: (n.onset_tick, -n.velocity, -n.offset_tick))
        kept: list[TickNote] = []
        for n in key_notes:
            if kept and n.onset_tick - kept[-1].onset_tick < REPEAT_TICKS:
                continue
            kept.append(n)
        for a, b in zip(kept, kept[1:]):
            end = min(a.offset_tick, b.onset_tick)
            out.append(a if end == a.offset_tick else TickNote(a.onset_tick, end, a.pitch,
                                                                a.velocity))
        if kept:
            out.append(kept[-1])
    return sorted(out, key=lambda n: (n.onset_tick, n.pitch, n.offset_tick, n.velocity))


def shifted_segments(notes: Sequence[Note], shift: float, n_segments: int
                     ) -> list[SegmentNotes]:
    """The segments of the grid that starts `shift` seconds into the piece (0 <= shift < 10).

    Row k of the embeddings covers [shift + 10 k, shift + 10 k + 10). Ticks are moved so that a
    virtual segment 0 covers the time before the shifted grid: notes from it are carried into
    the first real segment, as they sound there. Returns those real segments (indices 1..S).
    """
    shift_ticks = int(round(shift * V.TICKS_PER_SECOND))
    if not 0 <= shift_ticks < V.SEGMENT_TICKS:
        raise ValueError(f"grid shift must lie in [0, 10) s, got {shift}")
    base = V.SEGMENT_TICKS - shift_ticks
    ticks = [TickNote(n.onset_tick + base, n.offset_tick + base, n.pitch, n.velocity)
             for n in clean_ticknotes(quantize(notes))]
    return segment_notes(ticks, n_segments + 1)[1:]


@dataclass
class Example:
    item: int  # index into the split's EmbeddingItems
    shift: float
    row: int  # row of the item's [S, T, E] embeddings
    segment: SegmentNotes
    tokens: np.ndarray  # int64 [L]
    predicted: np.ndarray  # bool [L]


def build_examples(items: Sequence[EmbeddingItem], stage: str, shifts: Sequence[float] | None,
                   max_len: int) -> tuple[list[Example], int]:
    """Every segment of every item and shift that has a token to predict; returns (examples,
    number skipped as longer than max_len)."""
    examples, skipped = [], 0
    for i, item in enumerate(items):
        for shift in sorted(item.files):
            if shifts is not None and not any(abs(shift - s) < 1e-6 for s in shifts):
                continue
            n = int(item.segments(shift).shape[0])
            for row, seg in enumerate(shifted_segments(item.notes, shift, n)):
                tokens, predicted = encode(stage, seg)
                if not any(predicted):  # e.g. velocity stage, no own notes: nothing to learn
                    continue
                if len(tokens) > max_len:
                    skipped += 1
                    continue
                examples.append(Example(i, shift, row, seg, np.asarray(tokens, np.int64),
                                        np.asarray(predicted, bool)))
    return examples, skipped


class EmbeddingStore:
    """Memory-mapped embeddings, one segment (row) at a time, as float32."""

    def __init__(self, items: Sequence[EmbeddingItem]) -> None:
        self.items = items
        self._open: dict[tuple[int, float], np.ndarray] = {}

    def get(self, item: int, shift: float, row: int) -> np.ndarray:
        key = (item, shift)
        if key not in self._open:
            self._open[key] = self.items[item].segments(shift)
        return np.asarray(self._open[key][row], dtype=np.float32)


@dataclass
class TrainBatch:
    """Teacher-forced inputs [B, L-1], targets [B, L-1], loss mask [B, L-1], embeddings
    [B, T, E], and the inputs' query ticks [B, L-1] (vocab.query_ticks: what the runtime feeds
    a time-aligned decoder)."""

    inputs: Tensor
    targets: Tensor
    mask: Tensor
    emb: Tensor
    query_ticks: Tensor
    allowed: Tensor | None = None  # bool [B, L-1, vocab]: what the decode loop's grammar allows


def collate(examples: Sequence[Example], store: EmbeddingStore,
            grammar: str | None = None) -> TrainBatch:
    """Right padding with pad tokens, masked out of the loss; a causal decoder never lets
    padding influence the real positions before it. `grammar` (a stage): also what the decode
    loop would let each position predict (`allowed_next`)."""
    length = max(len(e.tokens) for e in examples)
    tokens = np.full((len(examples), length), V.PAD, np.int64)
    mask = np.zeros((len(examples), length), bool)
    for b, e in enumerate(examples):
        tokens[b, : len(e.tokens)] = e.tokens
        mask[b, : len(e.tokens)] = e.predicted
    emb = np.stack([store.get(e.item, e.shift, e.row) for e in examples])
    t = torch.from_numpy(tokens)
    ticks = V.query_ticks(tokens[:, :-1])
    allowed = None if grammar is None else torch.from_numpy(allowed_next(grammar, tokens, ticks))
    return TrainBatch(t[:, :-1], t[:, 1:], torch.from_numpy(mask[:, 1:]), torch.from_numpy(emb),
                      torch.from_numpy(ticks), allowed)


def allowed_next(stage: str, tokens: np.ndarray, query_ticks: np.ndarray) -> np.ndarray:
    """bool [B, L-1, vocab]: the tokens runtime/grammar.py lets each teacher-forced position
    of `tokens` [B, L] (`sos task ...`, PAD after the end) predict, as the decode loop masks
    them before its argmax. The reference token is always allowed (a reference the grammar
    refuses, e.g. a key re-struck within REPEAT_TICKS, still trains). The offset stage's
    limit of a key's next onset is left out: a note may end at any later tick or sustain."""
    batch, length = tokens.shape
    allowed = np.zeros((batch, length - 1, V.VOCAB_SIZE), dtype=bool)
    if stage in ("onset", "flat"):
        grammar = (OnsetGrammar if stage == "onset" else FlatGrammar)(batch, max_notes=length)
        for i in range(1, length - 1):  # position 0 predicts the task token
            allowed[:, i] = grammar.mask()
            grammar.update(tokens[:, i + 1])
    elif stage == "velocity":
        allowed[..., V.VELOCITY_BASE:] = True
    elif stage == "offset":
        ends = offset_mask(query_ticks.reshape(-1), np.full(query_ticks.size, -1))
        allowed[:] = ends.reshape(batch, length - 1, V.VOCAB_SIZE)
    else:
        raise ValueError(f"unknown stage {stage!r}")
    np.put_along_axis(allowed, tokens[:, 1:, None], True, axis=2)
    return allowed


class EpochSampler:
    """Shuffled passes over all examples; its state goes into state.pt."""

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        self.n, self.rng = n, rng
        self.order = rng.permutation(n)
        self.pos = 0
        self.epoch = 0

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= self.n:
                self.order, self.pos = self.rng.permutation(self.n), 0
                self.epoch += 1
            out.append(int(self.order[self.pos]))
            self.pos += 1
        return out

    def state(self) -> dict[str, Any]:
        return {"order": self.order.tolist(), "pos": self.pos, "epoch": self.epoch}

    def load(self, state: Mapping[str, Any]) -> None:
        self.order = np.asarray(state["order"], np.int64)
        self.pos, self.epoch = int(state["pos"]), int(state["epoch"])


def spread_examples(examples: Sequence[Example], k: int) -> list[Example]:
    """k examples spread evenly over the list (deterministic)."""
    if k >= len(examples):
        return list(examples)
    idx = np.linspace(0, len(examples) - 1, k).round().astype(int)
    return [examples[i] for i in idx]

