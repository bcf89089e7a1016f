"""Pre-train a roll-based encoder (CRNN or HPPNet) on frame-level piano-roll objectives.

    train_encoder("work/data/synth1", "hppnet", "runs/hppnet", steps=20000, batch=8,
                  crop_seconds=5.0, lr=5e-4)
    pianolm train encoder --data work/data/synth1 --encoder hppnet --out runs/hppnet
    pianolm train encoder --out runs/hppnet --resume          # continue exactly
    pianolm train tune-rolls --encoder-dir runs/hppnet --data work/data/synth1

Each step: `batch` random crops of `crop_seconds` from the rendered training split (any start
sample of any piece), targets from export/train/targets.py on the encoder's frame grid, BCE on
the onset / offset / frame rolls and the velocity roll masked to onset frames (Kong et al.),
AdamW with warmup + cosine decay, gradient clipping. Crops shorter than the 10 s inference
segment are fine for these convolutional / recurrent encoders and much cheaper per step.

Run folder (`out_dir`):
    state.pt             resumable state (model, optimizer, step, RNG states, config)
    encoder.safetensors  latest weights; encoder.json describes them (name, frame rate, targets,
                         tuned roll-decoding thresholds, last validation scores)
    best.safetensors     weights with the best validation onset F1 so far
    log.jsonl            {"kind": "train"|"val"|"devset", "step": N, ...} per line

Validation (every `val_every` steps and at the end): the encoder transcribes whole pieces of the
dataset's validation split in 10 s segments, as at inference; scores are frame F1 of the frame
roll (threshold 0.5) and note-level F1 of roll decoding (runtime/rolls.py), plus the roll
losses. The dev set (../shared/devset) is measured the same way; it is never trained on and
never used to choose anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pianolm.export.encoders import ENCODERS
from pianolm.runtime.audio import normalise_peak, segment_audio
from pianolm.runtime.metrics import matched_pairs
from pianolm.runtime.notes import Note
from pianolm.runtime.rolls import RollDecodeConfig, decode_rolls, join_segments
from pianolm.runtime.tokens import extend_by_pedal

from .common import (
    STATE_FILE,
    JsonlLog,
    atomic_torch_save,
    atomic_write_text,
    config_from,
    graceful_stop,
    load_state,
    lr_at,
    restore_rng,
    rng_state,
    set_lr,
    set_threads,
)
from .evaluate import load_devset, mean_scores, score_notes
from .targets import TargetConfig, roll_targets

SAMPLE_RATE = 16000
ENCODER_FILE = "encoder.safetensors"
ENCODER_JSON = "encoder.json"
BEST_FILE = "best.safetensors"
ROLL_LOSS_KEYS = ("onset", "offset", "frame", "velocity")


@dataclass(frozen=True)
class EncoderTrainConfig:
    data_root: str
    encoder: str = "hppnet"
    out_dir: str = "runs/encoder"
    steps: int = 20000
    batch: int = 8
    crop_seconds: float = 5.0
    lr: float = 5e-4  # Kong 5e-4, HPPNet 6e-4 (Adam)
    weight_decay: float = 0.01
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05
    grad_clip: float = 3.0  # HPPNet's clip
    seed: int = 0
    gain_db: float = 6.0  # random gain +-dB per crop (the render already augments more)
    # targets (export/train/targets.py)
    soft_targets: bool = True
    onset_width: float = 0.05
    offset_width: float = 0.05
    velocity_radius: int = 1
    # bookkeeping
    log_every: int = 10
    save_every: int = 250
    val_every: int = 1000
    val_items: int = 8  # validation-split pieces scored at each validation (0: none)
    devset: str | None = ""  # "" = default location if present; None or "none" = skip
    threads: int | None = None
    # Fine-tuning: start from another run's weights, and optionally train some roll heads only
    # (comma-separated, e.g. "velocity"): the rest stays frozen, so the other rolls, and the
    # embedding columns they make, do not move.
    init_from: str | None = None
    train_only: str = ""
    until_step: int | None = None  # stop (and save) after this step, as if interrupted

    def target_config(self, frames_per_second: float) -> TargetConfig:
        return TargetConfig(frames_per_second=frames_per_second, soft=self.soft_targets,
                            onset_width=self.onset_width, offset_width=self.offset_width,
                            velocity_radius=self.velocity_radius)


# ---------------------------------------------------------------------------------------------
# Data


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
# Loss


def roll_losses(rolls: Mapping[str, Tensor], targets: Mapping[str, Tensor]
                ) -> dict[str, Tensor]:
    """BCE per roll (probabilities in, as the encoders output them) and their sum "loss".

    Velocity: BCE against velocity / 127, averaged over the onset frames of `velocity_mask`
    only (Kong's masked velocity loss). Frame counts of rolls and targets may differ by a frame
    (front-end rounding): the common prefix is scored.
    """
    t = min(rolls["onset"].shape[1], targets["onset"].shape[1])
    out: dict[str, Tensor] = {}
    for key in ("onset", "offset", "frame"):
        p = rolls[key][:, :t].float().clamp(1e-7, 1 - 1e-7)
        out[key] = F.binary_cross_entropy(p, targets[key][:, :t])
    mask = targets["velocity_mask"][:, :t]
    p = rolls["velocity"][:, :t].float().clamp(1e-7, 1 - 1e-7)
    bce = F.binary_cross_entropy(p, targets["velocity"][:, :t], reduction="none")
    out["velocity"] = (bce * mask).sum() / mask.sum().clamp(min=1.0)
    out["loss"] = out["onset"] + out["offset"] + out["frame"] + out["velocity"]
    return out


# ---------------------------------------------------------------------------------------------
# Saving and loading encoders


def encoder_info(encoder: nn.Module) -> dict[str, Any]:
    return {"frames_per_second": float(encoder.frames_per_second),
            "embed_dim": int(encoder.embed_dim),
            "frames_per_segment": int(encoder.frames_per_segment)}


def save_encoder(encoder: nn.Module, name: str, folder: str | os.PathLike,
                 metadata: Mapping[str, Any] | None = None, file: str = ENCODER_FILE) -> Path:
    """Write `file` (safetensors) and encoder.json (name, frame rate, metadata) into folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    tmp = folder / (file + ".tmp")
    save_file(state, str(tmp), metadata={"encoder": name})
    os.replace(tmp, folder / file)
    if file == ENCODER_FILE:
        meta = {"format": "pianolm-encoder", "version": 1, "encoder": name,
                **encoder_info(encoder), **dict(metadata or {})}
        atomic_write_text(folder / ENCODER_JSON, json.dumps(meta, indent=1, default=str) + "\n")
    return folder / file


def read_encoder_meta(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / ENCODER_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (not an encoder run folder?)")
    return json.loads(path.read_text())


def load_encoder(folder: str | os.PathLike, best: bool = False,
                 encoder: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(encoder in eval mode, its encoder.json) from a run folder. `best`: best.safetensors
    when it exists. `encoder`: a module to load into (else built by name)."""
    from pianolm.export.encoders import build_encoder

    folder = Path(folder)
    meta = read_encoder_meta(folder)
    path = folder / (BEST_FILE if best and (folder / BEST_FILE).is_file() else ENCODER_FILE)
    module = encoder if encoder is not None else build_encoder(meta["encoder"])
    module.load_state_dict(load_file(str(path)), strict=True)
    return module.eval(), meta


def load_init_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """`--init`: another run's weights into `model`. A velocity head that now also reads level
    inputs (HPPNetConfig.velocity_level, appended after the trunk's channels) keeps the old
    weights of its first LSTM layer and gets zero weights for the new inputs: training starts
    from the old run's exact outputs."""
    read_encoder_meta(folder)  # a clear error for a folder that is no encoder run
    state = load_file(str(Path(folder) / ENCODER_FILE))
    own = model.state_dict()
    for key, old in state.items():
        new = own.get(key)
        if (new is not None and ".heads.velocity.lstm.weight_ih_l0" in key
                and new.shape[0] == old.shape[0] and new.shape[1] > old.shape[1]):
            state[key] = torch.cat((old, old.new_zeros(old.shape[0], new.shape[1] - old.shape[1])),
                                   dim=1)
    model.load_state_dict(state, strict=True)


def roll_config(meta: Mapping[str, Any]) -> RollDecodeConfig:
    """The tuned roll-decoding thresholds stored with an encoder (defaults if not tuned)."""
    return RollDecodeConfig.from_dict(meta.get("rolls") or {})


# ---------------------------------------------------------------------------------------------
# Running an encoder on whole pieces, scoring rolls


@torch.inference_mode()
def transcribe_rolls(encoder: nn.Module, audio: np.ndarray, batch: int = 4
                     ) -> dict[str, np.ndarray]:
    """Whole-piece rolls [T, 88] from 10 s segments (as at inference), joined in time."""
    segments = segment_audio(normalise_peak(audio, encoder.input_peak))
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ROLL_LOSS_KEYS}
    for i in range(0, len(segments), batch):
        out = encoder(torch.from_numpy(segments[i:i + batch]))
        for k in ROLL_LOSS_KEYS:
            parts[k].append(out.rolls[k].float().numpy())
    rolls = {k: np.concatenate(v) for k, v in parts.items()}
    return join_segments(rolls, encoder.frames_per_second, n_samples=len(audio))


def frame_f1(frame_roll: np.ndarray, frame_target: np.ndarray, threshold: float = 0.5
             ) -> tuple[float, float, float]:
    """Pooled (true positives, false positives, false negatives) counts as floats."""
    t = min(len(frame_roll), len(frame_target))
    p, r = frame_roll[:t] > threshold, frame_target[:t] > 0.5
    return float((p & r).sum()), float((p & ~r).sum()), float((~p & r).sum())


def _f1(tp: float, fp: float, fn: float) -> float:
    return 2 * tp / max(2 * tp + fp + fn, 1.0)


@dataclass
class ScoredPiece:
    name: str
    rolls: dict[str, np.ndarray]
    reference: list[Note]


def score_pieces(pieces: Sequence[ScoredPiece], fps: float, target_cfg: TargetConfig,
                 roll_cfg: RollDecodeConfig) -> dict[str, float]:
    """Roll losses, frame F1 and note-level scores of roll decoding, over whole pieces."""
    tp = fp = fn = 0.0
    losses: list[dict[str, float]] = []
    notes: list[dict[str, float]] = []
    for piece in pieces:
        n = len(piece.rolls["onset"])
        tgt = roll_targets(piece.reference, n, target_cfg).as_dict()
        a, b, c = frame_f1(piece.rolls["frame"], tgt["frame"])
        tp, fp, fn = tp + a, fp + b, fn + c
        with torch.no_grad():
            lo = roll_losses({k: torch.from_numpy(v)[None] for k, v in piece.rolls.items()},
                             {k: torch.from_numpy(v)[None] for k, v in tgt.items()})
        losses.append({("loss" if k == "loss" else f"loss_{k}"): float(v) for k, v in lo.items()})
        notes.append(score_notes(decode_rolls(piece.rolls, fps, roll_cfg), piece.reference))
    out = {"frame_f": _f1(tp, fp, fn), **mean_scores(losses), **mean_scores(notes)}
    out.pop("n_pred", None)
    out.pop("n_ref", None)
    return out


def validation_pieces(encoder: nn.Module, data_root: str | os.PathLike, n_items: int,
                      split: str = "validation") -> list[ScoredPiece]:
    from pianolm.export.data.dataset import load_item

    entries = dataset_entries(data_root, split)[:n_items] if n_items else []
    pieces = []
    for e in entries:
        audio, _, _ = load_item(data_root, e)
        pieces.append(ScoredPiece(e["id"], transcribe_rolls(encoder, audio),
                                  piece_notes(data_root, e)))
    return pieces


def devset_pieces(encoder: nn.Module, devset: str | None) -> list[ScoredPiece]:
    """Dev-set clips (reference offsets already pedal-extended); [] when it is absent."""
    if devset is None or devset == "none":
        return []
    try:
        clips = load_devset(devset or None)
    except FileNotFoundError:
        return []
    return [ScoredPiece(name, transcribe_rolls(encoder, audio), ref)
            for name, audio, ref in clips]


def tune_roll_thresholds(pieces: Sequence[ScoredPiece], fps: float,
                         base: RollDecodeConfig | None = None,
                         onset_grid: Iterable[float] = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45,
                                                        0.5, 0.6),
                         frame_grid: Iterable[float] = (0.1, 0.2, 0.3, 0.4, 0.5),
                         offset_grid: Iterable[float] = (0.2, 0.3, 0.4, 0.5, 1.01),
                         ) -> tuple[RollDecodeConfig, dict[str, float]]:
    """Coordinate search on validation pieces: the onset threshold for onset F1, then frame and
    offset thresholds together for onset+offset F1 (offset 1.01 = ignore offset peaks), then a
    velocity curve (`fit_velocity_curve`) if it raises onset+offset+velocity F1.
    Returns the best config and its mean scores."""
    cfg = base or RollDecodeConfig()

    def score(c: RollDecodeConfig) -> dict[str, float]:
        return mean_scores(score_notes(decode_rolls(p.rolls, fps, c), p.reference)
                           for p in pieces)

    best = max((replace(cfg, onset_threshold=t) for t in onset_grid),
               key=lambda c: score(c)["onset_f"])
    best = max((replace(best, frame_threshold=f, offset_threshold=o)
                for f in frame_grid for o in offset_grid),
               key=lambda c: score(c)["onset_offset_f"])
    scores = score(best)
    curved = replace(best, velocity_curve=fit_velocity_curve(pieces, fps, best))
    if curved.velocity_curve:  # kept only where it helps on these pieces
        curved_scores = score(curved)
        if curved_scores["onset_offset_velocity_f"] > scores["onset_offset_velocity_f"]:
            return curved, curved_scores
    return best, scores


def fit_velocity_curve(pieces: Sequence[ScoredPiece], fps: float, cfg: RollDecodeConfig,
                       degree: int = 2) -> tuple[float, ...]:
    """A least-squares polynomial from the velocity roll (x 127) to the reference velocity,
    over the notes `cfg` decodes that match a reference onset (50 ms, same pitch). mir_eval
    fits a line per piece anyway, so what a curve adds is its bend: the roll regresses toward
    the mean. () where it would not rise over 1..127, or with too few notes to fit."""
    plain = replace(cfg, velocity_curve=())
    pairs = [(p_.velocity, r.velocity) for p in pieces
             for p_, r in matched_pairs(decode_rolls(p.rolls, fps, plain), p.reference)]
    if len(pairs) < 10 * (degree + 1):
        return ()
    x, y = np.array(pairs, np.float64).T
    coef = np.polyfit(x, y, degree)
    if np.any(np.diff(np.polyval(coef, np.arange(1, 128))) <= 0):
        return ()
    return tuple(float(c) for c in coef)


# ---------------------------------------------------------------------------------------------
# Training


def head_parameters(model: nn.Module, heads: Sequence[str]) -> list[nn.Parameter]:
    """Freeze `model` except the named roll heads; returns the heads' parameters. A head is
    HPPNet's `heads.{name}` or the CRNN's `{name}_model` (Kong's acoustic sub-model)."""
    unknown = [h for h in heads if h not in ROLL_LOSS_KEYS]
    if unknown:
        raise ValueError(f"unknown roll head(s) {unknown}; choose from {list(ROLL_LOSS_KEYS)}")
    model.requires_grad_(False)
    chosen = []
    for name, param in model.named_parameters():
        if any(f"heads.{h}." in name or name.startswith(f"{h}_model.") for h in heads):
            param.requires_grad_(True)
            chosen.append(param)
    if not chosen:
        raise ValueError(f"{type(model).__name__} has no separate parameters for heads {heads}")
    return chosen


def _train_config(overrides: Mapping[str, Any], saved: Mapping[str, Any] | None
                  ) -> EncoderTrainConfig:
    if saved is not None:
        return config_from(EncoderTrainConfig, saved, overrides)
    if not overrides.get("data_root"):
        raise ValueError("a new encoder run needs data_root (--data)")
    return config_from(EncoderTrainConfig, {}, overrides)


def train_encoder(data_root: str | None = None, encoder_name: str | None = None,
                  out_dir: str | os.PathLike = "runs/encoder", steps: int | None = None,
                  batch: int | None = None, crop_seconds: float | None = None,
                  lr: float | None = None, *, resume: bool = False,
                  encoder: nn.Module | None = None, quiet: bool = False,
                  **options: Any) -> dict[str, Any]:
    """Train (or with resume=True continue) an encoder; returns a summary dict.

    Arguments left None come from the saved run when resuming, else from EncoderTrainConfig's
    defaults; `options` are further EncoderTrainConfig fields. `encoder`: a module to train
    instead of `build_encoder(encoder_name)` (tests use a small stub).
    """
    from pianolm.export.encoders import build_encoder

    out = Path(out_dir)
    saved = load_state(out) if resume else None
    if resume and saved is None:
        print(f"{out}: nothing to resume, starting a new run", file=sys.stderr)
    given = {"data_root": data_root, "encoder": encoder_name, "steps": steps, "batch": batch,
             "crop_seconds": crop_seconds, "lr": lr, **options}
    given = {k: v for k, v in given.items() if v is not None}
    given["out_dir"] = str(out)
    cfg = _train_config(given, saved["config"] if saved else None)
    if "until_step" not in given:  # a stop point belongs to one invocation, not to the run
        cfg = replace(cfg, until_step=None)
    set_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    model = encoder if encoder is not None else build_encoder(cfg.encoder)
    fps = float(model.frames_per_second)
    target_cfg = cfg.target_config(fps)
    n_samples = int(round(cfg.crop_seconds * SAMPLE_RATE))
    n_frames = int(model.num_frames(n_samples))
    if cfg.init_from and saved is None:
        load_init_weights(model, cfg.init_from)
    heads = [h for h in cfg.train_only.split(",") if h]
    params = head_parameters(model, heads) if heads else list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    step, best_f = 0, -1.0
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        restore_rng(saved["rng"], rng)
        step, best_f = int(saved["step"]), float(saved.get("best_f", -1.0))
    log = JsonlLog(out, resume_step=step if saved is not None else None, quiet=quiet)
    source = CropSource(cfg.data_root, "train", model.input_peak)
    last_val: dict[str, float] = dict(saved.get("last_val", {})) if saved else {}

    def save() -> None:
        atomic_torch_save({"step": step, "model": model.state_dict(),
                           "optimizer": optimizer.state_dict(), "rng": rng_state(rng),
                           "config": asdict(cfg), "best_f": best_f, "last_val": last_val},
                          out / STATE_FILE)
        save_encoder(model, cfg.encoder, out, {"step": step, "targets": asdict(target_cfg),
                                               "val": last_val, "train_config": asdict(cfg)})

    def validate() -> None:
        nonlocal best_f, last_val
        model.eval()
        pieces = validation_pieces(model, cfg.data_root, cfg.val_items)
        if pieces:
            last_val = score_pieces(pieces, fps, target_cfg, RollDecodeConfig())
            log.write("val", step, **last_val)
            if last_val["onset_f"] > best_f:
                best_f = last_val["onset_f"]
                save_encoder(model, cfg.encoder, out, file=BEST_FILE)
        dev = devset_pieces(model, cfg.devset)
        if dev:
            log.write("devset", step, **score_pieces(dev, fps, target_cfg, RollDecodeConfig()))
        model.train()

    stop_at = min(cfg.steps, cfg.until_step) if cfg.until_step is not None else cfg.steps
    model.train()
    sums: dict[str, float] = {}
    last_loss: float | None = None
    t0, n_timed = time.perf_counter(), 0
    with graceful_stop() as flag:
        while step < stop_at and not flag.stop:
            lr_now = lr_at(step, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
            set_lr(optimizer, lr_now)
            wave, targets = make_batch(source, rng, cfg.batch, n_samples, n_frames, target_cfg,
                                       cfg.gain_db)
            losses = roll_losses(model(wave).rolls, targets)
            if heads:
                losses["loss"] = sum(losses[h] for h in heads)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            last_loss = float(losses["loss"].detach())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            optimizer.step()
            step += 1
            n_timed += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            if step % cfg.log_every == 0 or step == stop_at:
                dt = (time.perf_counter() - t0) / n_timed
                log.write("train", step, **{k: v / n_timed for k, v in sums.items()},
                          lr=lr_now, grad_norm=grad_norm, sec_per_step=dt,
                          sec_per_step_per_crop_second=dt / (cfg.batch * cfg.crop_seconds))
                sums, t0, n_timed = {}, time.perf_counter(), 0
            if cfg.val_every and step % cfg.val_every == 0:
                validate()
            if cfg.save_every and step % cfg.save_every == 0:
                save()
    if step >= cfg.steps and cfg.val_every and step % cfg.val_every:
        validate()  # final scores for a finished run
    save()
    return {"step": step, "finished": step >= cfg.steps, "out_dir": str(out), "val": last_val,
            "last_loss": last_loss}


def tune_rolls(encoder_dir: str | os.PathLike, data_root: str | os.PathLike,
               n_items: int = 32, best: bool = True, devset: str | None = "",
               encoder: nn.Module | None = None, quiet: bool = False) -> dict[str, Any]:
    """Tune roll-decoding thresholds on validation pieces, store them in encoder.json
    ("rolls"), and report validation (and dev-set) scores with them."""
    model, meta = load_encoder(encoder_dir, best=best, encoder=encoder)
    fps = float(meta["frames_per_second"])
    pieces = validation_pieces(model, data_root, n_items)
    if not pieces:
        raise ValueError(f"{data_root}: no validation pieces to tune on")
    cfg, val = tune_roll_thresholds(pieces, fps)
    meta["rolls"] = cfg.to_dict()
    meta["rolls_tuned_on"] = {"data_root": str(data_root), "items": len(pieces),
                              "weights": BEST_FILE if best else ENCODER_FILE}
    result: dict[str, Any] = {"rolls": cfg.to_dict(), "validation": val}
    dev = devset_pieces(model, devset)
    if dev:
        per_clip = {p.name: score_notes(decode_rolls(p.rolls, fps, cfg), p.reference)
                    for p in dev}
        result["devset"] = mean_scores(per_clip.values())
        result["devset_clips"] = per_clip
    meta["rolls_scores"] = {k: v for k, v in result.items() if k != "devset_clips"}
    atomic_write_text(Path(encoder_dir) / ENCODER_JSON, json.dumps(meta, indent=1) + "\n")
    if not quiet:
        print(json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------------------------------------
# CLI


def add_cli(sub: argparse._SubParsersAction) -> None:
    S = argparse.SUPPRESS  # unset options stay unset: a resumed run keeps its saved values
    p = sub.add_parser("encoder", help="pre-train an encoder on piano-roll targets",
                       description=__doc__.split("\n\n")[0], argument_default=S)
    p.add_argument("--data", dest="data_root", help="rendered dataset root (index.json)")
    p.add_argument("--encoder", dest="encoder_name", choices=sorted(ENCODERS))
    p.add_argument("--out", dest="out_dir", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", default=False,
                   help="continue the run in --out exactly where it stopped")
    for name, kind in (("steps", int), ("batch", int), ("crop-seconds", float), ("lr", float),
                       ("weight-decay", float), ("warmup-steps", int), ("min-lr-ratio", float),
                       ("grad-clip", float), ("seed", int), ("gain-db", float),
                       ("onset-width", float), ("offset-width", float),
                       ("velocity-radius", int), ("log-every", int), ("save-every", int),
                       ("val-every", int), ("val-items", int), ("threads", int),
                       ("until-step", int), ("train-only", str)):
        p.add_argument(f"--{name}", type=kind)
    p.add_argument("--binary-targets", dest="soft_targets", action="store_false",
                   help="onsets-and-frames binary onset/offset targets instead of Kong's")
    p.add_argument("--devset", help="dev-set folder to measure on (default ../shared/devset)")
    p.add_argument("--no-devset", dest="devset", action="store_const", const="none")
    p.add_argument("--init", dest="init_from", metavar="RUN",
                   help="start from another encoder run's weights (fine-tuning)")
    p.set_defaults(func=_run_train)

    t = sub.add_parser("tune-rolls", help="tune roll-decoding thresholds on validation pieces")
    t.add_argument("--encoder-dir", required=True, help="encoder run folder")
    t.add_argument("--data", required=True, help="rendered dataset root")
    t.add_argument("--items", type=int, default=32, help="validation pieces to tune on")
    t.add_argument("--last", action="store_true", help="tune encoder.safetensors, not best")
    t.add_argument("--devset", default="")
    t.add_argument("--threads", type=int, default=None)
    t.set_defaults(func=_run_tune)


def _run_train(args: argparse.Namespace) -> int:
    opts = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    summary = train_encoder(**opts)
    print(json.dumps(summary, default=str))
    return 0


def _run_tune(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    tune_rolls(args.encoder_dir, args.data, args.items, best=not args.last, devset=args.devset)
    return 0
