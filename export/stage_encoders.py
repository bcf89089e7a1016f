"""Stages that read different encoders, run as one encoder graph.

The authors' training code fine-tunes a copy of the encoder with each stage and saves it beside
the stage (`step=N_encoder.pth`), so a system built with their scripts has up to three
encoders. pianolm keeps one encoder graph per model: `StageEncoders` runs each distinct encoder
once and concatenates their embeddings along the feature axis; each stage's decoder reads its
own part (DecoderConfig.enc_offset, manifest format 8). The rolls are those of one encoder of
the set (`rolls_from`). Stages that share an encoder share its part, and its pass.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .frontend import ROLL_KEYS, EncoderOutput

_SHARED = ("frames_per_second", "frames_per_segment", "input_peak")


class StageEncoders(nn.Module):
    """Distinct encoders, each run once: embeddings concatenated, rolls from `rolls_from`.

    encoders: name -> encoder (export/encoders.py interface); stages: stage -> the name of the
    encoder it reads; rolls_from: the name whose rolls the graph outputs.
    """

    def __init__(self, encoders: Mapping[str, nn.Module], stages: Mapping[str, str],
                 rolls_from: str) -> None:
        super().__init__()
        missing = sorted({*stages.values(), rolls_from} - set(encoders))
        if missing:
            raise ValueError(f"no encoder named {missing}; given {sorted(encoders)}")
        first = next(iter(encoders.values()))
        for name, enc in encoders.items():
            for attr in _SHARED:
                if getattr(enc, attr, None) != getattr(first, attr, None):
                    raise ValueError(f"encoder {name!r} has {attr} {getattr(enc, attr, None)}, "
                                     f"the others {getattr(first, attr, None)}")
        self.encoders = nn.ModuleDict(encoders)
        self.stages = dict(stages)
        self.rolls_from = rolls_from
        self.roll_keys = getattr(encoders[rolls_from], "roll_keys", ROLL_KEYS)  # EncoderGraph
        for attr in _SHARED:
            setattr(self, attr, getattr(first, attr, None))
        offsets, offset = {}, 0
        for name, enc in encoders.items():
            offsets[name] = offset
            offset += int(enc.embed_dim)
        self.embed_dim = offset
        self.part_widths = tuple(int(enc.embed_dim) for enc in encoders.values())  # manifest
        # stage -> (offset, width) of its encoder's embeddings (TranscriptionSystem checks
        # each decoder's enc_offset / enc_dim against it)
        self.stage_parts = {stage: (offsets[name], int(encoders[name].embed_dim))
                            for stage, name in self.stages.items()}
        self.config = {"parts": [{"name": name, "stages": [s for s, n in stages.items()
                                                           if n == name],
                                  "offset": offsets[name], "embed_dim": int(enc.embed_dim),
                                  "class": type(enc).__qualname__,
                                  "rolls": name == rolls_from}
                                 for name, enc in encoders.items()]}

    def num_frames(self, num_samples: int) -> int:
        return next(iter(self.encoders.values())).num_frames(num_samples)

    def forward(self, waveform: torch.Tensor) -> EncoderOutput:
        outputs = {name: enc(waveform) for name, enc in self.encoders.items()}
        return EncoderOutput(rolls=outputs[self.rolls_from].rolls,
                             embedding=torch.cat([o.embedding for o in outputs.values()], -1))

    def embed(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.forward(waveform).embedding
