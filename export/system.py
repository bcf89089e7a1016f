"""A whole transcription system: one frozen encoder shared by the stages' decoders.

Hierarchical (default, docs/model.md "Decoders"): decoders "onset", "velocity", "offset", all
reading the same encoder embeddings (one encoder pass feeds every stage). Flattened baseline:
one decoder "flat".
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pianolm.export.decoder import PRESETS, Decoder, DecoderConfig
from pianolm.runtime import vocab

SEGMENT_SAMPLES = int(16000 * vocab.SEGMENT_SECONDS)


def build_encoder(name: str) -> nn.Module:
    """The encoder by name ("crnn", "hppnet"). Looked up at call time (tests may swap it)."""
    from pianolm.export.encoders import build_encoder as _build  # the torch-heavy part, lazily

    return _build(name)


@dataclass(frozen=True)
class SystemConfig:
    encoder: str = "crnn"
    # a preset name, one DecoderConfig for every stage, or {stage: DecoderConfig}
    decoder: str | DecoderConfig | Mapping[str, DecoderConfig] = "small"
    hierarchical: bool = True  # False: the flattened baseline, one "flat" decoder
    # DecoderConfig fields for a preset, e.g. {"cross_positions": "time", "look_ahead": True};
    # "roll_prior": True gives each stage its own (stage_options)
    decoder_options: Mapping[str, object] = field(default_factory=dict)

    @property
    def stages(self) -> tuple[str, ...]:
        return vocab.STAGES if self.hierarchical else ("flat",)

    def decoder_configs(self, enc_dim: int, frames_per_segment: int, frames_per_second: float,
                        parts: Mapping[str, tuple[int, int]] | None = None
                        ) -> dict[str, DecoderConfig]:
        """Resolve `decoder` into one checked DecoderConfig per stage. parts: where each
        stage's embeddings lie, (offset, width), when the encoder concatenates several
        (export/stage_encoders.py); otherwise every stage reads the whole."""
        ticks_per_frame = round(vocab.TICKS_PER_SECOND / frames_per_second)
        if isinstance(self.decoder, str):
            options = {"ticks_per_frame": ticks_per_frame, **self.decoder_options}
            cfgs = {s: DecoderConfig.from_preset(self.decoder, enc_dim, **stage_options(options, s))
                    for s in self.stages}
        elif isinstance(self.decoder, DecoderConfig):
            cfgs = {s: self.decoder for s in self.stages}
        else:
            cfgs = dict(self.decoder)
            if set(cfgs) != set(self.stages):
                raise ValueError(f"decoder configs given for stages {sorted(cfgs)}, "
                                 f"the system has {list(self.stages)}")
            cfgs = {s: cfgs[s] for s in self.stages}
        for stage, c in cfgs.items():
            offset, width = (parts or {}).get(stage, (0, enc_dim))
            if (c.enc_offset, c.enc_dim) != (offset, width):
                raise ValueError(f"{stage} decoder expects enc_dim {c.enc_dim} at offset "
                                 f"{c.enc_offset}, encoder {self.encoder!r} gives {width} at "
                                 f"{offset}")
            if c.max_frames < frames_per_segment:
                raise ValueError(f"{stage} decoder max_frames {c.max_frames} < the encoder's "
                                 f"{frames_per_segment} frames per segment")
            if c.time_aligned and c.ticks_per_frame * frames_per_second != vocab.TICKS_PER_SECOND:
                raise ValueError(f"{stage} decoder ticks_per_frame {c.ticks_per_frame} does not "
                                 f"fit the encoder's {frames_per_second:g} frames/s")
        return cfgs


def stage_options(options: Mapping[str, object], stage: str) -> dict[str, object]:
    """Decoder options for one stage: `roll_prior: True` becomes the stage's own prior."""
    out = dict(options)
    if out.get("roll_prior") is True:
        out["roll_prior"] = stage
    elif out.get("roll_prior") is False:
        out["roll_prior"] = "none"
    return out


class TranscriptionSystem(nn.Module):
    def __init__(self, config: SystemConfig, encoder: nn.Module | None = None,
                 decoder_device: torch.device | str | None = None) -> None:
        """encoder: a ready (e.g. pretrained) encoder, else `build_encoder(config.encoder)`.
        decoder_device: build the decoders there; "meta" skips allocation and init (for
        counting parameters, or before loading a checkpoint with assign=True)."""
        super().__init__()
        self.config = config
        self.encoder = encoder if encoder is not None else build_encoder(config.encoder)
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.decoder_configs = config.decoder_configs(
            int(self.encoder.embed_dim), int(self.encoder.frames_per_segment),
            float(self.encoder.frames_per_second), getattr(self.encoder, "stage_parts", None))
        ctx = torch.device(decoder_device) if decoder_device is not None else nullcontext()
        with ctx:
            self.decoders = nn.ModuleDict(
                {stage: Decoder(cfg) for stage, cfg in self.decoder_configs.items()})

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(self.decoders.keys())

    def train(self, mode: bool = True) -> TranscriptionSystem:
        super().train(mode)
        self.encoder.eval()  # frozen: its BatchNorm statistics must not move
        return self

    def embed(self, waveform: Tensor) -> Tensor:
        """[B, 160000] float32 -> [B, T, E]; no gradient (the encoder is frozen)."""
        with torch.no_grad():
            return self.encoder.embed(waveform)

    def forward(self, waveform: Tensor, tokens: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Training step helper: one encoder pass, then each given stage's logits [B, S, V]."""
        emb = self.embed(waveform)
        return {stage: self.decoders[stage](tok, emb) for stage, tok in tokens.items()}


# ---------------------------------------------------------------------------------------------
# `pianolm info`


def _decoder_groups(decoder: nn.Module) -> dict[str, int]:
    groups = dict.fromkeys(("embeddings", "audio_in", "attention", "mlp", "norms", "head"), 0)
    for name, p in decoder.named_parameters():
        if name.startswith("tok_emb."):
            key = "embeddings"
        elif name.startswith(("audio_proj.", "audio_pe_proj.")):
            key = "audio_in"
        elif ".attn." in name or ".cross." in name:  # look-ahead slopes included
            key = "attention"
        elif ".mlp1." in name or ".mlp2." in name:
            key = "mlp"
        elif "norm" in name:
            key = "norms"
        elif name.startswith(("head.", "pointer.", "prior.")):  # the prior's scales: a few
            key = "head"
        else:  # a new parameter nobody classified: count it visibly rather than drop it
            key = "norms"
        groups[key] += p.numel()
    return groups


def _m(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def shipped_sizes(manifest: Mapping) -> tuple[str, str]:
    """(decoder preset, encoder name) of an exported model, from its manifest: `pianolm info`
    describes the shipped model unless told otherwise."""
    dec = manifest["stages"][0]["decoder"]
    sizes = (dec["n_layers"], dec["d_model"], dec["n_heads"])
    preset = next((name for name, p in PRESETS.items() if p == sizes), None)
    if preset is None:
        raise ValueError(f"the model's decoder sizes {sizes} are no preset of {sorted(PRESETS)}")
    return preset, manifest["encoder"]["name"]


def describe_parameters(preset: str, encoder: str, hierarchical: bool = True) -> str:
    """A parameter table for `pianolm info --preset P --encoder E`.

    Decoders are built on the meta device, so even "base" costs no memory or time.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown decoder preset {preset!r}; choose from {sorted(PRESETS)}")
    system = TranscriptionSystem(SystemConfig(encoder=encoder, decoder=preset,
                                              hierarchical=hierarchical), decoder_device="meta")
    enc_params = sum(p.numel() for p in system.encoder.parameters())
    cfg = next(iter(system.decoder_configs.values()))
    kind = "hierarchical" if hierarchical else "flattened"
    lines = [
        f"system: encoder {encoder} (embed_dim {cfg.enc_dim}, "
        f"{system.encoder.frames_per_segment} frames / 10 s), decoder preset {preset!r}: "
        f"{cfg.n_layers} layers, d {cfg.d_model}, {cfg.n_heads} heads (head_dim "
        f"{cfg.head_dim}), SwiGLU hidden {cfg.mlp_hidden}, vocab {cfg.vocab_size}; {kind}",
        "",
    ]
    cols = ("embeddings", "audio_in", "attention", "mlp", "norms", "head", "total")
    header = f"{'component':<20}" + "".join(f"{c:>13}" for c in cols)
    lines += [header, "-" * len(header)]
    lines.append(f"{'encoder (frozen)':<20}" + " " * 13 * 6 + f"{enc_params:>13,}")
    dec_total = 0
    for stage, dec in system.decoders.items():
        g = _decoder_groups(dec)
        total = sum(g.values())
        dec_total += total
        lines.append(f"{stage + ' decoder':<20}" + "".join(f"{g[c]:>13,}" for c in cols[:-1])
                     + f"{total:>13,}")
    lines.append("-" * len(header))
    lines.append(f"{'decoders':<20}" + " " * 13 * 6 + f"{dec_total:>13,}")
    lines.append(f"{'system':<20}" + " " * 13 * 6 + f"{enc_params + dec_total:>13,}")
    lines.append("")
    per_stage = dec_total // len(system.decoders)
    lines.append(f"encoder {_m(enc_params)}, per stage decoder {_m(per_stage)}, "
                 f"system {_m(enc_params + dec_total)} ({(enc_params + dec_total) * 4 / 2**20:.0f}"
                 f" MiB fp32)")
    # Decode-memory facts a deployer sizes batches with (fp32, per segment row, per stage).
    kv_tok = 2 * cfg.n_layers * cfg.d_model * 4
    cross = 2 * cfg.n_layers * int(system.encoder.frames_per_segment) * cfg.d_model * 4
    lines.append(f"per stage and segment (fp32): self-attention KV cache {kv_tok / 1024:.0f} KiB "
                 f"per token, cross K/V {cross / 2**20:.1f} MiB")
    return "\n".join(lines)
