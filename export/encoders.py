"""The roll-based encoders behind one interface.

Every encoder is an nn.Module taking a 16 kHz mono waveform [B, samples] with:
- `forward(waveform) -> EncoderOutput(rolls, embedding)`: rolls maps onset / offset / frame /
  velocity to [B, T, 88] posteriors in (0, 1); embedding is [B, T, embed_dim].
- `embed(waveform) -> Tensor [B, T, embed_dim]`: what the language model attends to.
- `embed_dim`, `frames_per_second`, `frames_per_segment` (frames for `segment_samples`), and
  `num_frames(num_samples)` (= num_samples // hop + 1, centred frames).
- `input_peak`: None, or the peak every input file is scaled to before it is cut into
  segments (runtime/audio.py normalise_peak); the manifest carries it to the runtime.

| name   | front-end          | frames/s | frames per 10 s | embed_dim | parameters |
|--------|--------------------|----------|-----------------|-----------|------------|
| crnn   | log-mel, 229 bins  | 100      | 1001            | 1536      | ~20.2 M    |
| hppnet | CQT, 352 bins (dB) | 50       | 501             | 352       | ~1.24 M    |

The front-end is part of the module, written as fixed convolutions and matmuls, so the
whole encoder exports to ONNX (opset 18, dynamo) with the waveform as its only input and no
DFT/STFT, If or Loop nodes: see `EncoderGraph`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pianolm.runtime.graphs import ENCODER_ROLLS_IO

from .crnn import CRNN, CRNNConfig
from .frontend import ROLL_KEYS, EncoderOutput
from .hppnet import HPPNET_SP_CPU, HPPNET_SP_CPU_VL, HPPNet, HPPNetConfig

__all__ = [
    "CRNN",
    "CRNNConfig",
    "ENCODERS",
    "ENCODER_OUTPUT_NAMES",
    "EncoderGraph",
    "EncoderOutput",
    "HPPNet",
    "HPPNetConfig",
    "ROLL_KEYS",
    "build_encoder",
]

# name -> (class, config; None = the class's default). "hppnet-cpu" is HPPNet-sp at half width
# after the harmonic conv (export/hppnet.py, HPPNET_SP_CPU): the size a CPU trains in hours;
# "hppnet-cpu-vl" adds the level-aware velocity head (HPPNET_SP_CPU_VL).
ENCODERS: dict[str, tuple[type[nn.Module], Any]] = {
    "crnn": (CRNN, None),
    "hppnet": (HPPNet, None),
    "hppnet-cpu": (HPPNet, HPPNET_SP_CPU),
    "hppnet-cpu-vl": (HPPNet, HPPNET_SP_CPU_VL),
}

# Graph output order of `EncoderGraph`: the embedding, then the four rolls.
ENCODER_OUTPUT_NAMES: tuple[str, ...] = ENCODER_ROLLS_IO[1]  # the graph contract's names


def build_encoder(name: str, config: Any = None) -> nn.Module:
    """Instantiate an encoder by name (a key of ENCODERS), with its own config or `config`."""
    try:
        cls, default = ENCODERS[name]
    except KeyError:
        known = ", ".join(sorted(ENCODERS))
        raise ValueError(f"unknown encoder {name!r}; known encoders: {known}") from None
    return cls(config if config is not None else default)


class EncoderGraph(nn.Module):
    """Export view of an encoder: waveform -> (embeddings, onset, offset, frame, velocity).

    A flat tuple of tensors in `ENCODER_OUTPUT_NAMES` order, so the ONNX graph's outputs can
    be named and read without knowing the pytree of `EncoderOutput`.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    @property
    def roll_keys(self) -> tuple[str, ...]:
        """The rolls the graph outputs: ROLL_KEYS, then an encoder's pedal rolls if it has a
        pedal model (its `roll_keys`; runtime/graphs.py ENCODER_PEDAL_IO)."""
        return getattr(self.encoder, "roll_keys", ROLL_KEYS)

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.encoder(waveform)
        return (out.embedding, *(out.rolls[key] for key in self.roll_keys))
