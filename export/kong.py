"""Kong et al.'s published piano transcription checkpoint (notes and pedal), imported.

Kong, Li, Song, Wan, Wang 2021, "High-resolution piano transcription with pedals by
regressing onset and offset times"; checkpoint `CRNN_note_F1=0.9677_pedal_F1=0.9186.pth`
(Zenodo 4034264), code in the PyPI package `piano_transcription_inference`. The file is a
`torch.save` of `{'model': {'note_model': state_dict, 'pedal_model': state_dict}, ...}`.

`KongCRNN` is that model rebuilt from pianolm's parts: the note model is our `CRNN` (which
mirrors Kong's `Regress_onset_offset_frame_velocity_CRNN` key for key) and the pedal model,
`KongPedal`, mirrors `Regress_pedal_CRNN` (an input BatchNorm and three one-class acoustic
sub-models). Both of Kong's models carry their own copy of the same fixed torchlibrosa
front-end (STFT kernels and mel matrix), so the log-mel is computed once and shared.

`load_kong_checkpoint` differs from Kong's loader (`load_state_dict(strict=False)`, which
ignores anything that does not fit) in that it:
- loads tensors only (`weights_only=True`): a file that holds pickled objects is refused
  without being executed;
- checks the layout, every key and every shape, and names what is wrong in one line;
- checks that the stored front-end tensors equal our fixed kernels, then drops them (they
  are rebuilt, not loaded: see `frontend.LogMel`);
- folds an epsilon difference: Kong writes `nn.BatchNorm2d(n, momentum)`, whose second
  positional argument is `eps`, so every BatchNorm2d of his (bn0 and the conv blocks' bn1,
  bn2) has eps = 0.01 (and the default momentum 0.1). Ours have eps = 1e-5. In eval mode a
  BatchNorm divides by sqrt(running_var + eps), so adding 0.01 - 1e-5 to running_var gives
  his normalisation exactly. The BatchNorm1d bn5 is built with `momentum=` and keeps 1e-5.

`random_kong_state` and `save_kong_checkpoint` write a checkpoint of Kong's layout with random
weights, for tests and benchmarks that cannot download the real one (~172 MB).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .crnn import _EPS, CRNN, AcousticModel, CRNNConfig
from .frontend import EncoderOutput, LogMel
from .torch_files import load_torch_file

__all__ = [
    "KONG_BN2D_EPS",
    "KongCRNN",
    "KongImportError",
    "KongPedal",
    "load_kong_checkpoint",
    "random_kong_state",
    "save_kong_checkpoint",
]

KONG_BN2D_EPS = 0.01  # what Kong's positional `momentum` argument sets (see module doc)

# Kong's front-end tensors, stored in both sub-models' state dicts (torchlibrosa names).
_STFT_REAL = "spectrogram_extractor.stft.conv_real.weight"
_STFT_IMAG = "spectrogram_extractor.stft.conv_imag.weight"
_MEL = "logmel_extractor.melW"
_FRONTEND_KEYS = (_STFT_REAL, _STFT_IMAG, _MEL)
# Largest difference from our kernels accepted, relative to each tensor's largest entry:
# both are float32 roundings of the same float64 formulas.
_FRONTEND_RTOL = 1e-5

# Our submodule name -> Kong's sub-model name in the checkpoint.
_PARTS = {"note": "note_model", "pedal": "pedal_model"}
_OUTPUT_LAYERS = ("fc", "reg_onset_fc", "frame_fc")  # random_kong_state scales these
_SHOW = 4  # keys named per kind of mismatch in an error line


class KongImportError(ValueError):
    """A checkpoint that cannot be imported as Kong's Note_pedal model (one-line message)."""


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class KongPedal(nn.Module):
    """Kong's `Regress_pedal_CRNN` without its front-end: log-mel in, three pedal rolls out."""

    def __init__(self, config: CRNNConfig | None = None) -> None:
        super().__init__()
        cfg = config or CRNNConfig()
        one = replace(cfg, classes=1)  # one pedal (sustain) per sub-model
        self.bn0 = nn.BatchNorm2d(cfg.frontend.n_mels, momentum=cfg.bn_momentum)
        self.reg_pedal_onset_model = AcousticModel(one)
        self.reg_pedal_offset_model = AcousticModel(one)
        self.reg_pedal_frame_model = AcousticModel(one)

    def forward(self, logmel: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B, 1, T, mels] -> pedal_onset, pedal_offset, pedal_frame, each [B, T, 1]."""
        x = self.bn0(logmel.transpose(1, 3)).transpose(1, 3)  # BatchNorm per mel bin
        onset, _ = self.reg_pedal_onset_model(x)
        offset, _ = self.reg_pedal_offset_model(x)
        frame, _ = self.reg_pedal_frame_model(x)
        return {"pedal_onset": onset, "pedal_offset": offset, "pedal_frame": frame}


class KongCRNN(nn.Module):
    """Kong's combined note and pedal model (`Note_pedal`), waveform [B, samples] at 16 kHz in.

    `forward` returns CRNN's rolls (onset, offset, frame, velocity [B, T, 88]) plus
    pedal_onset, pedal_offset, pedal_frame [B, T, 1], and CRNN's 1536-d embedding.
    """

    frames_per_second = CRNN.frames_per_second
    roll_keys: tuple[str, ...] = (
        "onset", "offset", "frame", "velocity", "pedal_onset", "pedal_offset", "pedal_frame",
    )

    def __init__(self, config: CRNNConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or CRNNConfig()
        self.note = CRNN(cfg)
        self.pedal = KongPedal(cfg)
        self.embed_dim = self.note.embed_dim
        self.frames_per_segment = self.note.frames_per_segment
        self.input_peak = None  # inputs as they are, like CRNN

    def num_frames(self, num_samples: int) -> int:
        return self.note.num_frames(num_samples)

    def forward(self, waveform: torch.Tensor) -> EncoderOutput:
        logmel = self.note.frontend(waveform).unsqueeze(1)  # [B, 1, T, mels], shared
        note = self.note.from_logmel(logmel)
        pedal = self.pedal(logmel)
        rolls = {
            **note.rolls,
            **{key: roll.clamp(_EPS, 1 - _EPS) for key, roll in pedal.items()},
        }
        return EncoderOutput(rolls=rolls, embedding=note.embedding)

    def embed(self, waveform: torch.Tensor) -> torch.Tensor:
        """[B, samples] -> [B, T, 1536]; the pedal model does not contribute."""
        return self.note.embed(waveform)


def _kong_eps_layers(model: KongCRNN) -> list[str]:
    """Our names of the BatchNorms that have eps 0.01 in Kong's code: all the BatchNorm2d."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def _frontend_tensors(frontend: LogMel) -> dict[str, torch.Tensor]:
    """Our fixed kernels in torchlibrosa's layout: STFT [bins, 1, n_fft] x 2, mel [bins, mels]."""
    bins = frontend.n_bins
    return {
        _STFT_REAL: frontend.stft_kernels[:bins],
        _STFT_IMAG: frontend.stft_kernels[bins:],  # -sin atoms, as librosa's e^{-i w n}
        _MEL: frontend.mel_matrix,
    }


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_kong_checkpoint(path: str | os.PathLike) -> tuple[KongCRNN, dict[str, Any]]:
    """Kong's Note_pedal checkpoint -> (KongCRNN in eval mode, info).

    info: path, parameters (total, note, pedal), eps_folded (our names of the BatchNorms
    whose running_var got + (0.01 - 1e-5)), eps_fold (that amount), and other_keys (the
    checkpoint's top-level keys besides 'model', e.g. 'iteration').
    Raises KongImportError (one line, naming the file) for anything else.
    """
    path = Path(path)
    checkpoint = load_torch_file(path, KongImportError)  # tensors only, never code
    parts, other_keys = _kong_parts(path, checkpoint)

    model = KongCRNN()
    ours = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for prefix, kong_name in _PARTS.items():
        part = parts[kong_name]
        expected = {k[len(prefix) + 1 :]: v for k, v in ours.items() if k.startswith(prefix + ".")}
        problem = _compare_keys(kong_name, part, expected)
        if problem:
            problems.append(problem)
            continue
        _check_frontend(path, kong_name, part, model.note.frontend)  # shared front-end
        for key in expected:
            if key in part:
                state[f"{prefix}.{key}"] = part[key]
            else:  # only num_batches_tracked may be absent (see _compare_keys)
                state[f"{prefix}.{key}"] = expected[key]
    if problems:
        raise KongImportError(f"{path}: not Kong's Note_pedal layout: {'; '.join(problems)}")

    fold = KONG_BN2D_EPS - model.note.bn0.eps
    folded = _kong_eps_layers(model)
    for name in folded:
        key = f"{name}.running_var"
        state[key] = state[key].to(torch.float32) + fold
    model.load_state_dict(state, strict=True)
    model.eval()

    info = {
        "path": str(path),
        "parameters": sum(p.numel() for p in model.parameters()),
        "note_parameters": sum(p.numel() for p in model.note.parameters()),
        "pedal_parameters": sum(p.numel() for p in model.pedal.parameters()),
        "eps_fold": fold,
        "eps_folded": folded,
        "other_keys": other_keys,
    }
    return model, info


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(v, torch.Tensor) for v in obj.values()
    )


def _kong_parts(path: Path, checkpoint: Any) -> tuple[dict[str, dict], list[str]]:
    """{'model': {'note_model': sd, 'pedal_model': sd}, ...} (Kong's file), or one flat
    Note_pedal state dict (the authors' fine-tuned encoders) -> (the two state dicts, other
    keys).

    Both sub-models are required: a note-only checkpoint (Kong's training saves the note
    model alone as {'iteration', 'model': state_dict}) has no pedal weights to import, and
    for the note model alone pianolm's CRNN already takes the state dict key for key.
    """
    expected = "expected {'model': {'note_model': ..., 'pedal_model': ...}} as in " \
        "CRNN_note_F1=0.9677_pedal_F1=0.9186.pth"
    note_only = "a note-only (or single-model) state dict; KongCRNN needs both note_model " \
        "and pedal_model (load a note-only state dict into pianolm's CRNN instead)"
    if _is_state_dict(checkpoint) and checkpoint and all(
            str(k).split(".", 1)[0] in _PARTS.values() for k in checkpoint):
        # Note_pedal.state_dict(): the encoders the LLM decoder's authors fine-tune and save
        # per stage (`step=N_encoder.pth`), keys 'note_model.*' and 'pedal_model.*'
        return {name: {k.split(".", 1)[1]: v for k, v in checkpoint.items()
                       if k.startswith(name + ".")} for name in _PARTS.values()}, []
    if _is_state_dict(checkpoint):
        raise KongImportError(f"{path}: holds {note_only}")
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        kind = f"keys {sorted(map(str, checkpoint))[:_SHOW]}" if isinstance(checkpoint, dict) \
            else type(checkpoint).__name__
        raise KongImportError(f"{path}: holds {kind}; {expected}")
    inner = checkpoint["model"]
    if _is_state_dict(inner):
        raise KongImportError(f"{path}: 'model' holds {note_only}")
    if not isinstance(inner, dict) or set(inner) != set(_PARTS.values()):
        kind = f"keys {sorted(map(str, inner))[:_SHOW]}" if isinstance(inner, dict) \
            else type(inner).__name__
        raise KongImportError(f"{path}: 'model' holds {kind}; {expected}")
    for name in _PARTS.values():
        if not _is_state_dict(inner[name]):
            raise KongImportError(f"{path}: 'model'['{name}'] is not a state dict of tensors")
    others = sorted(str(k) for k in checkpoint if k != "model")
    return {name: inner[name] for name in _PARTS.values()}, others


def _compare_keys(name: str, part: dict, expected: dict[str, torch.Tensor]) -> str:
    """'' if `part` has exactly the expected keys (plus the front-end) and shapes, else why.

    BatchNorm's num_batches_tracked may be missing (older torch did not save it; it does
    not affect eval): our zeros are kept.
    """
    wanted = {**{k: v.shape for k, v in expected.items()},
              **{k: None for k in _FRONTEND_KEYS}}  # front-end shapes: _check_frontend
    missing = [k for k in wanted if k not in part and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in part if k not in wanted]
    shapes = [
        f"{k} {list(part[k].shape)} (want {list(wanted[k])})"
        for k in wanted
        if k in part and wanted[k] is not None and part[k].shape != wanted[k]
    ]
    found = []
    kinds = (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
    for label, keys in kinds:
        if keys:
            more = f", +{len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
            found.append(f"{len(keys)} {label}: {', '.join(keys[:_SHOW])}{more}")
    return f"{name}: {'; '.join(found)}" if found else ""


def _check_frontend(path: Path, name: str, part: dict, frontend: LogMel) -> None:
    """Kong's stored STFT kernels and mel matrix must equal ours (we rebuild, not load, them)."""
    for key, ours in _frontend_tensors(frontend).items():
        theirs = part[key]
        if theirs.shape != ours.shape:
            raise KongImportError(
                f"{path}: {name}.{key} has shape {list(theirs.shape)}, our front-end "
                f"{list(ours.shape)}"
            )
        diff = (theirs.to(torch.float32) - ours).abs().max().item()
        scale = ours.abs().max().item()
        if not diff <= _FRONTEND_RTOL * scale:  # `not <=` also catches NaN
            raise KongImportError(
                f"{path}: {name}.{key} differs from pianolm's fixed front-end by {diff:.3g} "
                f"(largest entry {scale:.3g}); a different STFT/mel setup cannot be imported"
            )


# --------------------------------------------------------------------------------------
# Random checkpoints of Kong's layout
# --------------------------------------------------------------------------------------


def _tones(seed: int, seconds: float = 4.0, rate: int = 16000) -> torch.Tensor:
    """[1, samples]: decaying harmonic tones at random times and pitches, plus a little noise,
    the audio random_kong_state calibrates its BatchNorms on."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * rate)
    t = torch.arange(n) / rate
    out = 1e-3 * torch.randn(n, generator=g)
    for _ in range(24):
        start = float(torch.rand(1, generator=g)) * seconds
        f0 = 27.5 * 2 ** (float(torch.randint(0, 88, (1,), generator=g)) / 12)
        amp = 0.02 + 0.1 * float(torch.rand(1, generator=g))
        dt = (t - start).clamp(min=0)
        env = (t >= start) * torch.exp(-3 * dt)
        for h in range(1, 6):
            if h * f0 < rate / 2:
                out += amp / h * env * torch.sin(2 * torch.pi * h * f0 * dt)
    return out[None]


def random_kong_state(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """{'note_model': sd, 'pedal_model': sd} with Kong's key names and random weights.

    Built from KongCRNN (Kong's package not needed), front-end tensors included, stored as
    Kong stores them (eps not folded). A model whose rolls barely move with the audio (its
    GRU gates saturated) makes a poor test: ties between neighbouring frames decide peaks, so
    a 1e-6 difference changes the notes. So the BatchNorms are calibrated as training would
    leave them, on synthetic tones: each layer's running mean and variance are the statistics
    of its input. Before that, the layer feeding each conv-block BatchNorm and bn5 is
    rescaled per channel so that its variance lands in [0.005, 0.05]: Kong's eps of 0.01 then
    changes the outputs a lot, and a loader that forgets the fold is caught. The output
    layers get a negative bias, so that rolls rest low and rise at events, as trained ones
    do. The global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = KongCRNN()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.normal_(0.0, 0.2)
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in _OUTPUT_LAYERS:
                module.weight.data.mul_(3.0)
                module.bias.data.fill_(-2.0)
        # the pedal frame roll must cross Kong's 0.5 now and then for presses to be detected
        model.pedal.reg_pedal_frame_model.fc.bias.data.fill_(0.0)
        _calibrate(model, _tones(seed))
    state = model.state_dict()
    frontend = _frontend_tensors(model.note.frontend)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for prefix, kong_name in _PARTS.items():
        part = {k[len(prefix) + 1 :]: v.clone() for k, v in state.items()
                if k.startswith(prefix + ".")}
        out[kong_name] = {**{k: v.clone() for k, v in frontend.items()}, **part}
    return out


def _calibrate(model: KongCRNN, audio: torch.Tensor) -> None:
    """Running statistics from one pass over `audio`, as Kong's eval mode will read them
    (eps 0.01 on every BatchNorm2d). Train-mode BatchNorm normalises by the batch's own
    statistics, so one pass sees every layer's input whatever the running values; momentum 1
    makes the running values those statistics. Rescaling a BatchNorm's input by c > 0 leaves
    its train-mode output unchanged, so the feeding layer is rescaled after the pass and the
    statistics with it."""
    feeders: dict[nn.Module, nn.Module] = {}
    for module in model.modules():
        for i in (1, 2):
            conv, bn = getattr(module, f"conv{i}", None), getattr(module, f"bn{i}", None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                feeders[bn] = conv
        if isinstance(module, AcousticModel):
            feeders[module.bn5] = module.fc5
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    saved = {m: m.momentum for m in norms}
    dropouts = [m for m in model.modules() if isinstance(m, AcousticModel)]
    try:
        for m in norms:
            m.momentum = 1.0
            m.reset_running_stats()
        for m in dropouts:  # the statistics of eval mode's activations: no dropout
            m.conv_dropout, m.dropout = 0.0, 0.0
        model.train()
        with torch.no_grad():
            model(audio)
    finally:
        model.eval()
        for m in norms:
            m.momentum = saved[m]
        for m in dropouts:
            m.conv_dropout, m.dropout = model.config.conv_dropout, model.config.dropout
    with torch.no_grad():
        for bn, layer in feeders.items():
            target = torch.empty_like(bn.running_var).uniform_(0.005, 0.05)
            scale = (target / bn.running_var.clamp(min=1e-12)).sqrt()
            layer.weight.mul_(scale.view(-1, *([1] * (layer.weight.dim() - 1))))
            bn.running_mean.mul_(scale)
            bn.running_var.copy_(target)
        for bn in norms:
            bn.num_batches_tracked.fill_(1000)


def save_kong_checkpoint(state: dict[str, dict[str, torch.Tensor]],
                         path: str | os.PathLike) -> None:
    """Write `state` ({'note_model': sd, 'pedal_model': sd}) as Kong's file does."""
    torch.save({"model": {name: state[name] for name in _PARTS.values()}}, path)
