"""A tiny trainable-shaped system for export and runtime tests, exported once per test session.

The encoder is a small conv + biGRU stand-in with the encoder interface (the real CRNN / HPPNet
exports take ~40-60 s each on a 2-core machine; they run in test_export_encoders.py and the
devset parity tests when PIANOLM_SLOW_TESTS=1). Decoder weights are random but sharpened, so
argmax decisions are meaningful and a wrong graph shows up as different tokens.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from pianolm.export.crnn import GRU
from pianolm.export.decoder import sharpen
from pianolm.export.frontend import ROLL_KEYS, EncoderOutput
from pianolm.export.onnx_export import EX_SAMPLES, export_model
from pianolm.export.precision import convert_model
from pianolm.export.system import SystemConfig, TranscriptionSystem


class TinyEncoder(nn.Module):
    """The encoder interface at test size: framing conv (hop 3200, 5 frames/s) + biGRU (the
    CRNN's export-friendly GRU, native ONNX GRU nodes) -> 24-d embeddings; any input length.
    Rolls: a fixed (parameter-free, RNG-free: the decoders' random init stays as it was)
    projection of the embeddings, squashed to 0..1."""

    input_peak = None  # audio as it is (see export/encoders.py)

    def __init__(self, embed_dim: int = 24, hop: int = 3200) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.frames_per_segment = 160000 // hop + 1
        self.frames_per_second = 16000 / hop
        self.conv = nn.Conv1d(1, 16, kernel_size=hop, stride=hop, padding=hop // 2)
        self.gru = GRU(16, embed_dim // 2, batch_first=True, bidirectional=True)
        grid = torch.outer(torch.arange(1.0, embed_dim + 1), torch.arange(1.0, 4 * 88 + 1))
        self.register_buffer("roll_proj", torch.cos(0.37 * grid), persistent=False)

    def embed(self, waveform: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv(waveform.unsqueeze(1))).transpose(1, 2)
        return self.gru(x)[0]

    def forward(self, waveform: torch.Tensor) -> EncoderOutput:
        emb = self.embed(waveform)
        rolls = torch.sigmoid(4.0 * emb @ self.roll_proj - 2.0)
        return EncoderOutput(rolls=dict(zip(ROLL_KEYS, rolls.split(88, dim=2))), embedding=emb)


def make_system(hierarchical: bool, seed: int) -> TranscriptionSystem:
    torch.manual_seed(seed)
    system = TranscriptionSystem(SystemConfig(encoder="tiny-test", decoder="tiny",
                                              hierarchical=hierarchical), encoder=TinyEncoder())
    for i, dec in enumerate(system.decoders.values()):
        sharpen(dec, seed=seed * 10 + i)  # O(1) logits: argmax is meaningful, bugs show
    return system.eval()


class Exported:
    def __init__(self, root: Path) -> None:
        t0 = time.perf_counter()
        self.hier = make_system(True, seed=0)
        self.flat = make_system(False, seed=1)
        self.dirs = {"hier": root / "hier", "flat": root / "flat"}
        export_model(self.hier, self.dirs["hier"], seed=0, example_samples=EX_SAMPLES)
        export_model(self.flat, self.dirs["flat"], seed=1, example_samples=EX_SAMPLES)
        print(f"\nexported 2 systems (10 graphs) in {time.perf_counter() - t0:.0f} s")
        self.root = root

    def precision(self, name: str) -> Path:
        """The hierarchical system at fp16 / int8, derived from its fp32 folder once."""
        out = self.root / f"hier-{name}"
        if not out.exists():
            convert_model(self.dirs["hier"], out, name)
        return out


def export_tiny(root: Path) -> Exported:
    """Export both tiny systems with one torch thread (tiny ops: threads only add overhead)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Exported(root)
    finally:
        torch.set_num_threads(threads)
