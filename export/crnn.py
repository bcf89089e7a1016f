"""CRNN encoder: Kong et al. 2021, "High-resolution piano transcription with pedals" (note model).

Waveform -> log-mel (229 bins, 100 frames/s) -> input BatchNorm over mel bins -> four
acoustic sub-models of one design (onset, offset, frame, velocity) -> an onset biGRU
conditioned on velocity, and a frame biGRU conditioned on onsets and offsets.

The language model reads the three 512-d biGRU outputs of the onset head, the offset
sub-model and the frame head, concatenated: 1536-d per frame (Li, Zang, Kong 2025).

Module names mirror Kong's `Regress_onset_offset_frame_velocity_CRNN` (bn0, frame_model,
reg_onset_model, ..., conv_block1.conv1, fc5, bn5, gru, fc, reg_onset_gru, frame_gru), so a
state dict of his note model maps onto this one key for key (his front-end weights are
fixed and rebuilt here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .frontend import EncoderOutput, LogMel, LogMelConfig
from .rnn_weights import onnx_rnn_weights

try:  # torch >= 2.8: emit arbitrary ONNX ops from the module during torch.onnx.export
    from torch.onnx import ops as onnx_ops
except ImportError:  # pragma: no cover - older torch exports GRUs the slow way
    onnx_ops = None

# Sigmoid outputs are clamped away from 0 and 1 so that logs (BCE, logits) stay finite
# downstream; 1 - 1e-7 rounds to the largest float32 below 1.
_EPS = 1e-7


@dataclass(frozen=True)
class CRNNConfig:
    frontend: LogMelConfig = field(default_factory=LogMelConfig)
    segment_samples: int = 160000  # 10 s at 16 kHz
    classes: int = 88
    conv_channels: tuple[int, ...] = (48, 64, 96, 128)
    fc_dim: int = 768
    gru_hidden: int = 256
    bn_momentum: float = 0.01  # Kong's value
    conv_dropout: float = 0.2
    dropout: float = 0.5

    @property
    def mid_features(self) -> int:
        """Channels x mel bins left after one halving of frequency per conv block."""
        bins = self.frontend.n_mels
        for _ in self.conv_channels:
            bins //= 2
        return self.conv_channels[-1] * bins


class GRU(nn.GRU):
    """nn.GRU (batch_first) that exports as native ONNX GRU nodes, in time independent of T.

    The dynamo exporter handles nn.GRU, but computes its shapes by unrolling the GRU cell over
    every time step in fake-tensor mode, in several passes: minutes for this model at 101
    frames here, far longer at the 1001 of a segment. Under torch.onnx.export this emits one
    ONNX GRU per layer directly (weights reordered from PyTorch's r, z, n gates to ONNX's
    z, r, h; linear_before_reset=1 is PyTorch's formulation). Eager behaviour and parameter
    names are nn.GRU's.
    """

    def forward(self, x: torch.Tensor, hx: torch.Tensor | None = None):  # type: ignore[override]
        if onnx_ops is None or hx is not None or not torch.onnx.is_in_onnx_export():
            return super().forward(x, hx)
        if not self.batch_first or (self.training and self.dropout > 0):
            raise NotImplementedError("ONNX GRU path: batch_first, no inter-layer dropout")
        h, dirs = self.hidden_size, 2 if self.bidirectional else 1
        y = x.transpose(0, 1)  # ONNX GRU layout 0: [T, B, input]
        steps, batch = y.shape[0], y.shape[1]
        finals = []
        for layer in range(self.num_layers):
            out, final = onnx_ops.symbolic_multi_out(
                "GRU",
                [y, *onnx_rnn_weights(self, layer, _zrn)],
                {
                    "hidden_size": h,
                    "direction": "bidirectional" if dirs == 2 else "forward",
                    "linear_before_reset": 1,
                },
                dtypes=(x.dtype, x.dtype),
                shapes=([steps, dirs, batch, h], [dirs, batch, h]),
            )
            y = out.permute(0, 2, 1, 3).reshape(steps, batch, dirs * h)
            finals.append(final)
        return y.transpose(0, 1), torch.cat(finals)


def _zrn(weight: torch.Tensor, hidden: int) -> torch.Tensor:
    """PyTorch GRU gate blocks (r, z, n) -> ONNX order (z, r, n)."""
    return torch.cat((weight[hidden : 2 * hidden], weight[:hidden], weight[2 * hidden :]))


class ConvBlock(nn.Module):
    """Two (3x3 conv, BatchNorm, ReLU), then average pooling by 2 along frequency."""

    def __init__(self, c_in: int, c_out: int, momentum: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out, momentum=momentum)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T, F]
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, kernel_size=(1, 2))


class AcousticModel(nn.Module):
    """Kong's AcousticModelCRnn8Dropout: conv stack, FC, 2-layer biGRU, FC + sigmoid."""

    def __init__(self, cfg: CRNNConfig) -> None:
        super().__init__()
        channels = (1, *cfg.conv_channels)
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
            self.add_module(f"conv_block{i + 1}", ConvBlock(c_in, c_out, cfg.bn_momentum))
        self.n_blocks = len(cfg.conv_channels)
        self.fc5 = nn.Linear(cfg.mid_features, cfg.fc_dim, bias=False)
        self.bn5 = nn.BatchNorm1d(cfg.fc_dim, momentum=cfg.bn_momentum)
        self.gru = GRU(
            cfg.fc_dim, cfg.gru_hidden, num_layers=2, batch_first=True, bidirectional=True
        )
        self.fc = nn.Linear(2 * cfg.gru_hidden, cfg.classes)
        self.conv_dropout = cfg.conv_dropout
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 1, T, mels] -> (posteriors [B, T, 88], biGRU output [B, T, 512])."""
        for i in range(self.n_blocks):
            x = getattr(self, f"conv_block{i + 1}")(x)
            x = F.dropout(x, self.conv_dropout, self.training)
        x = x.transpose(1, 2).flatten(2)  # [B, T, C * F]
        x = self.fc5(x)
        x = F.relu(self.bn5(x.transpose(1, 2)).transpose(1, 2))
        x = F.dropout(x, self.dropout, self.training)
        hidden, _ = self.gru(x)
        x = F.dropout(hidden, self.dropout, self.training)
        return torch.sigmoid(self.fc(x)), hidden


class CRNN(nn.Module):
    """Kong et al.'s note transcription CRNN, waveform in. About 20 M parameters."""

    frames_per_second = 100

    def __init__(self, config: CRNNConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or CRNNConfig()
        self.frontend = LogMel(cfg.frontend)
        self.bn0 = nn.BatchNorm2d(cfg.frontend.n_mels, momentum=cfg.bn_momentum)
        self.frame_model = AcousticModel(cfg)
        self.reg_onset_model = AcousticModel(cfg)
        self.reg_offset_model = AcousticModel(cfg)
        self.velocity_model = AcousticModel(cfg)
        gru_out = 2 * cfg.gru_hidden
        self.reg_onset_gru = GRU(
            2 * cfg.classes, cfg.gru_hidden, batch_first=True, bidirectional=True
        )
        self.reg_onset_fc = nn.Linear(gru_out, cfg.classes)
        self.frame_gru = GRU(3 * cfg.classes, cfg.gru_hidden, batch_first=True, bidirectional=True)
        self.frame_fc = nn.Linear(gru_out, cfg.classes)
        self.embed_dim = 3 * gru_out
        self.input_peak = None  # inputs as they are (see HPPNetConfig.input_peak)
        self.frames_per_segment = self.frontend.num_frames(cfg.segment_samples)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier for convs and linears, orthogonal recurrent weights, zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GRU):
                for name, p in m.named_parameters():
                    if name.startswith("weight_ih"):
                        for gate in p.chunk(3, 0):
                            nn.init.xavier_uniform_(gate)
                    elif name.startswith("weight_hh"):
                        for gate in p.chunk(3, 0):
                            nn.init.orthogonal_(gate)
                    else:
                        nn.init.zeros_(p)

    def num_frames(self, num_samples: int) -> int:
        return self.frontend.num_frames(num_samples)

    def forward(self, waveform: torch.Tensor) -> EncoderOutput:
        """[B, samples] at 16 kHz -> rolls [B, T, 88] and embedding [B, T, 1536]."""
        return self.from_logmel(self.frontend(waveform).unsqueeze(1))

    def from_logmel(self, logmel: torch.Tensor) -> EncoderOutput:
        """`forward` after the front-end: log-mel [B, 1, T, mels] in (a model that shares the
        front-end, export/kong.py, computes it once)."""
        x = self.bn0(logmel.transpose(1, 3)).transpose(1, 3)  # BatchNorm per mel bin
        frame, _ = self.frame_model(x)
        onset, _ = self.reg_onset_model(x)
        offset, offset_hidden = self.reg_offset_model(x)
        velocity, _ = self.velocity_model(x)

        # Onsets conditioned on velocity (Kong: onset, sqrt(onset) * velocity); detach as
        # Kong does so the heads' losses do not train the sub-models through each other.
        x = torch.cat((onset, onset.sqrt() * velocity.detach()), dim=2)
        onset_hidden, _ = self.reg_onset_gru(x)
        x = F.dropout(onset_hidden, self.config.dropout, self.training)
        onset = torch.sigmoid(self.reg_onset_fc(x))

        # Frames conditioned on the refined onsets and on offsets.
        x = torch.cat((frame, onset.detach(), offset.detach()), dim=2)
        frame_hidden, _ = self.frame_gru(x)
        x = F.dropout(frame_hidden, self.config.dropout, self.training)
        frame = torch.sigmoid(self.frame_fc(x))

        rolls = {
            "onset": onset.clamp(_EPS, 1 - _EPS),
            "offset": offset.clamp(_EPS, 1 - _EPS),
            "frame": frame.clamp(_EPS, 1 - _EPS),
            "velocity": velocity.clamp(_EPS, 1 - _EPS),
        }
        embedding = torch.cat((onset_hidden, offset_hidden, frame_hidden), dim=2)
        return EncoderOutput(rolls=rolls, embedding=embedding)

    def embed(self, waveform: torch.Tensor) -> torch.Tensor:
        """[B, samples] -> [B, T, 1536]: onset-head, offset and frame-head biGRU outputs."""
        return self.forward(waveform).embedding
