"""Helpers for the training tests: a tiny stand-in encoder with the encoders' interface, and a
small rendered-format dataset of synthetic tones written to disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch import nn

from pianolm.export.data.dataset import write_pedal_tsv
from pianolm.export.frontend import ROLL_KEYS, EncoderOutput
from pianolm.runtime.midi import write_notes_tsv
from pianolm.runtime.notes import Note

SR = 16000


class StubEncoder(nn.Module):
    """Strided conv "front-end" + linear heads: waveform [B, n] -> rolls [B, n // hop + 1, 88]
    and an embedding, like CRNN / HPPNet but tiny and fast."""

    input_peak = None  # audio as it is (see export/encoders.py)

    def __init__(self, frames_per_second: int = 100, embed_dim: int = 16, channels: int = 32):
        super().__init__()
        self.frames_per_second = frames_per_second
        self.hop = SR // frames_per_second
        self.conv = nn.Conv1d(1, channels, kernel_size=2 * self.hop, stride=self.hop,
                              padding=self.hop)
        self.heads = nn.Linear(channels, 4 * 88)
        nn.init.constant_(self.heads.bias, -2.0)  # quiet rolls at init: few spurious notes
        self.proj = nn.Linear(channels, embed_dim)
        self.embed_dim = embed_dim
        self.frames_per_segment = self.num_frames(10 * SR)

    def num_frames(self, num_samples: int) -> int:
        return num_samples // self.hop + 1

    def forward(self, waveform: torch.Tensor) -> EncoderOutput:
        x = torch.tanh(self.conv(waveform[:, None])).transpose(1, 2)  # [B, T, C]
        y = torch.sigmoid(self.heads(x)).clamp(1e-7, 1 - 1e-7)
        rolls = dict(zip(ROLL_KEYS, y.split(88, dim=2)))
        return EncoderOutput(rolls=rolls, embedding=self.proj(x))

    def embed(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.forward(waveform).embedding


def random_notes(rng: np.random.Generator, seconds: float, n: int) -> list[Note]:
    notes = []
    for _ in range(n):
        on = round(float(rng.uniform(0, seconds - 0.5)), 2)
        notes.append(Note(on, round(on + float(rng.uniform(0.1, 1.5)), 2),
                          int(rng.integers(40, 90)), int(rng.integers(20, 120))))
    from pianolm.export.data.common import tidy_notes

    return tidy_notes(notes)


def synth(notes: list[Note], seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    x = np.zeros_like(t)
    for n in notes:
        f = 440 * 2 ** ((n.pitch - 69) / 12)
        on = (t >= n.onset) & (t < n.offset)
        x += on * np.sin(2 * np.pi * f * t) * np.exp(-3 * np.clip(t - n.onset, 0, None)) * (
            n.velocity / 127)
    return (0.3 * x / max(np.abs(x).max(), 1e-9)).astype(np.float32)


def make_dataset(root: Path, n_train: int = 3, n_val: int = 1, seconds: float = 12.0,
                 seed: int = 0, pianos: tuple[str, ...] = ()) -> Path:
    """A dataset in export/data/dataset.py's layout (index.json + flac/tsv/pedal.tsv); items
    name `pianos` as their instruments in turn."""
    rng = np.random.default_rng(seed)
    items = []
    for split, count in (("train", n_train), ("validation", n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            item_id = f"{split}-{i:06d}"
            notes = random_notes(rng, seconds, 30)
            pedal = [(2.0, 3.5)] if i % 2 == 0 else []
            sf.write(root / split / f"{item_id}.flac", synth(notes, seconds), SR,
                     subtype="PCM_16")
            write_notes_tsv(notes, root / split / f"{item_id}.tsv")
            write_pedal_tsv(pedal, root / split / f"{item_id}.pedal.tsv")
            items.append({"id": item_id, "split": split, "audio": f"{split}/{item_id}.flac",
                          "notes": f"{split}/{item_id}.tsv",
                          "pedal": f"{split}/{item_id}.pedal.tsv", "seconds": seconds,
                          "n_notes": len(notes),
                          **({"instrument": pianos[i % len(pianos)]} if pianos else {})})
    index = {"format": "pianolm-rendered", "version": 1, "sample_rate": SR, "items": items,
             "counts": {"train": n_train, "validation": n_val}}
    (root / "index.json").write_text(json.dumps(index))
    return root
