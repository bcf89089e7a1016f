"""HPPNet encoder: Wei et al., ISMIR 2022, "HPPNet: Modeling the Harmonic Structure and Pitch
Invariance in Piano Transcription".

Waveform -> CQT in dB (352 bins, 48 per octave, 50 frames/s) -> acoustic trunk -> heads.

Trunk ("CNNTrunk"): three 7x7 convs (16 ch); a harmonic dilated conv (8 parallel 1x3 convs
whose frequency dilations round(48 log2 k), k = 2..9, reach the k-th harmonic, summed); a
1x3 conv at dilation 48 (an octave) and max-pool (1, 4) down to the 88 keys; a 1x3 conv at
dilation 12 (an octave again, now in keys); three 5x1 convs along time. Each conv is followed
by ReLU and InstanceNorm (the authors' order).

Head ("frequency-grouped" BiLSTM): the same BiLSTM runs along time for each of the 88
pitches independently (pitch folded into the batch), then a linear layer and a sigmoid.

Variants, as in the authors' configurations (WX-Wei/HPPNet, `hpp_sp` / `hpp_base`):
- "sp" (the paper's best, ~1.2 M parameters): two separate trunks. The onset subnet feeds the
  onset head; the frame subnet feeds the frame, offset and velocity heads and runs at half the
  frame rate (max-pool by 2 along time in, bilinear upsampling of the posteriors back out).
- "base" (~0.8 M): one trunk shared by all four heads.
`HPPNET_SP_CPU` (ours, not the authors'): "sp" at half the width after the harmonic conv
(model_size 64: 0.38 M parameters), cheaper to train and run on CPU (the training-step
ratio: README, "The default model").

Level-aware velocity (ours, `velocity_level`): the InstanceNorm after every conv makes the
trunk nearly blind to the input's level (the plain "hppnet-cpu" gives velocities only ~3
lower for a file played 12 dB quieter), so its velocity can only come from loudness relative
to the rest of the segment, and each 10 s segment is its own reference. With `velocity_level`
the velocity head also reads the CQT level itself (each key's loudest bin, at the key and at
key offsets such as its octave), and `input_peak` fixes the reference: each file is scaled to
that peak, in training and at inference (runtime/audio.py `normalise_peak`).

The language model reads the four posterior maps concatenated: 4 x 88 = 352-d per frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .frontend import CQT, ROLL_KEYS, CQTConfig, EncoderOutput
from .rnn_weights import onnx_rnn_weights

try:  # torch >= 2.8: emit arbitrary ONNX ops from the module during torch.onnx.export
    from torch.onnx import ops as onnx_ops
except ImportError:  # pragma: no cover - older torch exports LSTMs the slow way
    onnx_ops = None

_EPS = 1e-7  # the authors clip posteriors to [1e-7, 1 - 1e-7]


@dataclass(frozen=True)
class HPPNetConfig:
    frontend: CQTConfig = field(default_factory=CQTConfig)
    segment_samples: int = 160000  # 10 s at 16 kHz
    variant: Literal["sp", "base"] = "sp"
    harmonic_channels: int = 16
    model_size: int = 128  # trunk output channels = LSTM width (64 per direction)
    harmonics: int = 8  # harmonics 2..9 in the harmonic dilated conv
    keys: int = 88
    velocity_level: tuple[int, ...] = ()  # key offsets of the level inputs of the velocity head
    input_peak: float | None = None  # the peak each input file is scaled to (None: as it is)

    @property
    def bins_per_key(self) -> int:
        return self.frontend.n_bins // self.keys


# A CPU-sized "sp": the 7x7 and harmonic stages as in the paper (16 channels), the trunk after
# them and the BiLSTMs at half width (64; 32 per direction). 375,300 parameters instead of
# 1,239,428; its CPU training step against "sp": README, "The default model".
# Its checkpoints are not interchangeable with "sp" ones (different shapes).
HPPNET_SP_CPU = HPPNetConfig(model_size=64)
# ... with a level-aware velocity head: the level at the key, the octave below (is the key
# itself a harmonic of a louder note?) and the key's 2nd, 3rd and 4th harmonics.
HPPNET_SP_CPU_VL = replace(HPPNET_SP_CPU, velocity_level=(-12, 0, 12, 19, 24), input_peak=0.7)

# Level inputs: CQT dB (10 log10 |C|, about -70..+10 for a file at peak 0.7) -> about -6..2.
LEVEL_OFFSET_DB, LEVEL_SCALE_DB = 10.0, 10.0
LEVEL_FLOOR = -8.0  # what a key offset past either end of the keyboard reads


def key_levels(cqt_db: torch.Tensor, bins_per_key: int, offsets: tuple[int, ...]) -> torch.Tensor:
    """[B, 1, T, bins] CQT dB -> [B, len(offsets), T, keys]: channel j holds, at key k, the
    scaled level of key k + offsets[j] (its loudest CQT bin)."""
    level = (F.max_pool2d(cqt_db, (1, bins_per_key)) + LEVEL_OFFSET_DB) / LEVEL_SCALE_DB
    reach = max(abs(o) for o in offsets)
    padded = F.pad(level, (reach, reach), value=LEVEL_FLOOR)
    keys = level.shape[-1]
    return torch.cat([padded[..., reach + o: reach + o + keys] for o in offsets], dim=1)


def conv_block(
    c_in: int,
    c_out: int,
    kernel: int | tuple[int, int],
    dilation: tuple[int, int] = (1, 1),
    pool: int | None = None,
) -> nn.Sequential:
    """Conv ('same' padding) -> ReLU -> [max-pool over `pool` bins] -> InstanceNorm.

    With pooling the module order is conv, pool, ReLU: max and ReLU commute exactly (values
    and gradients), and the ReLU then touches a quarter of the data. Only the conv (index 0)
    holds parameters, so the checkpoint keys are the same either way.
    """
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, padding="same", dilation=dilation)]
    if pool is not None:
        layers.append(FreqMaxPool(pool))
    layers += [nn.ReLU(), nn.InstanceNorm2d(c_out)]
    return nn.Sequential(*layers)


class FreqMaxPool(nn.Module):
    """Max over groups of `size` adjacent frequency bins: [B, C, T, F] -> [B, C, T, F / size].

    nn.MaxPool2d((1, size)) as a reduction over a reshaped view, which is faster on CPU
    (max_pool2d's kernel for this shape is slower in training, and more so at inference).
    With autograd, max(dim) routes the gradient to the first maximum as max_pool2d does;
    without it, amax is the fastest. The ONNX export keeps MaxPool.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():  # ONNX Runtime's MaxPool beats its ReduceMax here
            return F.max_pool2d(x, (1, self.size))
        groups = x.unflatten(3, (x.shape[3] // self.size, self.size))
        if torch.is_grad_enabled() and x.requires_grad:
            return groups.max(dim=4).values
        return groups.amax(dim=4)


class HarmonicDilatedConv(nn.Module):
    """Sum of 1x3 convs dilated to the log-frequency distance of harmonics 2..9.

    The parameters are those of the separate convs (`convs.{i}.weight/bias`, as in the
    authors' code and our checkpoints), but the sum is evaluated as one batched matmul:
    between them the convs read the input at only 2 * harmonics + 1 frequency offsets (0,
    shared by all, and +-d_i), so their taps are regrouped by offset (the centre taps summed)
    and applied to the shifted copies of the input stacked along channels. Same function with
    17/24 of the multiply-adds, as one large GEMM instead of 8 thin dilated convolutions and
    7 full-size additions: the trunk's costliest layer gets faster in PyTorch on CPU,
    forward and backward. The ONNX export keeps the separate convs (see `forward`).
    """

    def __init__(self, c_in: int, c_out: int, bins_per_octave: int, harmonics: int) -> None:
        super().__init__()
        self.dilations = [round(bins_per_octave * math.log2(k)) for k in range(2, harmonics + 2)]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, (1, 3), padding="same", dilation=(1, d)) for d in self.dilations
        )
        # The frequency offset each block of `merged_weight` reads, in order.
        self.offsets = [0] + [sign * d for d in self.dilations for sign in (-1, 1)]

    def merged_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [c_out, offsets * c_in], bias [c_out]) of the equivalent single matmul."""
        taps = [conv.weight[:, :, 0] for conv in self.convs]  # [c_out, c_in, 3] each
        # Conv2d is a cross-correlation: tap j of a conv dilated by d reads x[f + (j - 1) d].
        blocks = [sum(w[:, :, 1] for w in taps)]
        for w in taps:
            blocks += [w[:, :, 0], w[:, :, 2]]
        return torch.cat(blocks, dim=1), sum(conv.bias for conv in self.convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            # ONNX Runtime fuses each conv with the Add after it: there the plain sum runs as
            # fast as the merged matmul (measured), whose shifted copies become a memory-bound
            # Slice + Concat. Export the authors' form.
            return self.forward_separate(x)
        b, _, t, f = x.shape
        weight, bias = self.merged_weight()
        reach = max(self.dilations)
        padded = F.pad(x, (reach, reach))  # the convs' zero "same" padding
        shifted = torch.stack([padded.narrow(3, reach + o, f) for o in self.offsets], dim=1)
        # [B, offsets * c_in, T * F]; baddbmm takes the bias in the same pass over the output.
        y = torch.baddbmm(
            bias[:, None].expand(b, -1, 1),
            weight.expand(b, -1, -1),
            shifted.reshape(b, -1, t * f),
        )
        return F.relu(y.reshape(b, -1, t, f))

    def forward_separate(self, x: torch.Tensor) -> torch.Tensor:
        """The same function as the literal sum of the dilated convs (the reference)."""
        y = self.convs[0](x)
        for conv in self.convs[1:]:
            y = y + conv(x)
        return F.relu(y)


class Trunk(nn.Module):
    """[B, 1, T, 352] CQT dB -> [B, model_size, T, 88]."""

    def __init__(self, cfg: HPPNetConfig) -> None:
        super().__init__()
        c_har, size, bpo = cfg.harmonic_channels, cfg.model_size, cfg.frontend.bins_per_octave
        self.block_1 = conv_block(1, c_har, 7)
        self.block_2 = conv_block(c_har, c_har, 7)
        self.block_2_5 = conv_block(c_har, c_har, 7)
        self.conv_3 = HarmonicDilatedConv(c_har, size, bpo, cfg.harmonics)
        self.block_4 = conv_block(size, size, (1, 3), dilation=(1, bpo), pool=cfg.bins_per_key)
        # After pooling one bin is one key: dilation 12 is again an octave.
        self.block_5 = conv_block(size, size, (1, 3), dilation=(1, bpo // cfg.bins_per_key))
        self.block_6 = conv_block(size, size, (5, 1))
        self.block_7 = conv_block(size, size, (5, 1))
        self.block_8 = conv_block(size, size, (5, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_2_5(self.block_2(self.block_1(x)))
        x = self.block_4(self.conv_3(x))
        return self.block_8(self.block_7(self.block_6(self.block_5(x))))


class LSTM(nn.LSTM):
    """nn.LSTM (batch_first) that exports as native ONNX LSTM nodes, in time independent of T.

    The dynamo exporter handles nn.LSTM, but computes its shapes by unrolling the cell over
    every time step in fake-tensor mode (minutes per export here). Under torch.onnx.export
    this emits one ONNX LSTM per layer directly, with the gate blocks reordered from
    PyTorch's (i, f, g, o) to ONNX's (i, o, f, c). Eager behaviour and parameter names are
    nn.LSTM's.
    """

    def forward(self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None):  # type: ignore[override]
        if onnx_ops is None or hx is not None or not torch.onnx.is_in_onnx_export():
            return super().forward(x, hx)
        if not self.batch_first or self.proj_size or (self.training and self.dropout > 0):
            raise NotImplementedError("ONNX LSTM path: batch_first, no projection or dropout")
        h, dirs = self.hidden_size, 2 if self.bidirectional else 1
        y = x.transpose(0, 1)  # ONNX LSTM layout 0: [T, B, input]
        steps, batch = y.shape[0], y.shape[1]
        finals_h, finals_c = [], []
        for layer in range(self.num_layers):
            out, final_h, final_c = onnx_ops.symbolic_multi_out(
                "LSTM",
                [y, *onnx_rnn_weights(self, layer, _iofc)],
                {"hidden_size": h, "direction": "bidirectional" if dirs == 2 else "forward"},
                dtypes=(x.dtype,) * 3,
                shapes=([steps, dirs, batch, h], [dirs, batch, h], [dirs, batch, h]),
            )
            y = out.permute(0, 2, 1, 3).reshape(steps, batch, dirs * h)
            finals_h.append(final_h)
            finals_c.append(final_c)
        return y.transpose(0, 1), (torch.cat(finals_h), torch.cat(finals_c))


def _iofc(weight: torch.Tensor, hidden: int) -> torch.Tensor:
    """PyTorch LSTM gate blocks (i, f, g, o) -> ONNX order (i, o, f, c)."""
    h = hidden
    return torch.cat((weight[:h], weight[3 * h :], weight[h : 2 * h], weight[2 * h : 3 * h]))


class FreqGroupLSTMHead(nn.Module):
    """One BiLSTM shared by all pitches: [B, size + extra, T, 88] -> posteriors [B, T, 88]."""

    def __init__(self, size: int, extra: int = 0) -> None:
        super().__init__()
        self.lstm = LSTM(size + extra, size // 2, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, keys = x.shape
        x = x.permute(0, 3, 2, 1).reshape(b * keys, t, c)  # each pitch its own sequence
        x, _ = self.lstm(x)
        x = self.linear(x).reshape(b, keys, t)
        return torch.sigmoid(x).transpose(1, 2)


class SubNet(nn.Module):
    """A trunk and the heads reading it; optionally at half the frame rate."""

    def __init__(self, cfg: HPPNetConfig, heads: tuple[str, ...], time_pooling: bool) -> None:
        super().__init__()
        self.trunk = Trunk(cfg)
        self.level_offsets = cfg.velocity_level if "velocity" in heads else ()
        self.bins_per_key = cfg.bins_per_key
        self.heads = nn.ModuleDict({
            name: FreqGroupLSTMHead(cfg.model_size,
                                    len(self.level_offsets) if name == "velocity" else 0)
            for name in heads})
        self.time_pooling = time_pooling

    def forward(self, cqt_db: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B, 1, T, 352] -> {head: [B, T, 88]}."""
        frames = cqt_db.shape[2]
        x = F.max_pool2d(cqt_db, (2, 1)) if self.time_pooling else cqt_db
        features = self.trunk(x)
        out = {}
        for name, head in self.heads.items():
            if name == "velocity" and self.level_offsets:
                levels = key_levels(x, self.bins_per_key, self.level_offsets)
                y = head(torch.cat((features, levels), dim=1))
            else:
                y = head(features)
            if self.time_pooling:  # back to the full frame rate
                y = F.interpolate(
                    y.unsqueeze(1), size=(frames, y.shape[-1]), mode="bilinear", align_corners=False
                ).squeeze(1)
            out[name] = y.clamp(_EPS, 1 - _EPS)
        return out


class HPPNet(nn.Module):
    """HPPNet (default: the "sp" variant), waveform in. About 1.2 M parameters."""

    frames_per_second = 50

    def __init__(self, config: HPPNetConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or HPPNetConfig()
        if cfg.frontend.n_bins != cfg.keys * cfg.bins_per_key:
            raise ValueError("CQT bins must be a whole number per key")
        self.frontend = CQT(cfg.frontend)
        if cfg.variant == "sp":
            self.subnets = nn.ModuleList(
                [
                    SubNet(cfg, ("onset",), time_pooling=False),
                    SubNet(cfg, ("frame", "offset", "velocity"), time_pooling=True),
                ]
            )
        elif cfg.variant == "base":
            self.subnets = nn.ModuleList([SubNet(cfg, ROLL_KEYS, time_pooling=False)])
        else:
            raise ValueError(f"unknown HPPNet variant {cfg.variant!r} (expected 'sp' or 'base')")
        self.embed_dim = len(ROLL_KEYS) * cfg.keys
        self.input_peak = cfg.input_peak
        self.frames_per_segment = self.frontend.num_frames(cfg.segment_samples)

    def num_frames(self, num_samples: int) -> int:
        return self.frontend.num_frames(num_samples)

    def forward(self, waveform: torch.Tensor) -> EncoderOutput:
        """[B, samples] at 16 kHz -> rolls [B, T, 88] and embedding [B, T, 352]."""
        cqt_db = self.frontend(waveform).unsqueeze(1)  # [B, 1, T, 352]
        rolls: dict[str, torch.Tensor] = {}
        for subnet in self.subnets:
            rolls.update(subnet(cqt_db))
        rolls = {key: rolls[key] for key in ROLL_KEYS}
        embedding = torch.cat([rolls[key] for key in ROLL_KEYS], dim=2)
        return EncoderOutput(rolls=rolls, embedding=embedding)

    def embed(self, waveform: torch.Tensor) -> torch.Tensor:
        """[B, samples] -> [B, T, 352]: onset, offset, frame, velocity posteriors (88 each)."""
        return self.forward(waveform).embedding
