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
validation split in 10 s segments, as at inference; scores are frame F1 of the frame roll
(threshold 0.5) and note-level F1 of roll decoding (runtime/rolls.py), plus the roll losses,
over all pieces and per piano ("pianos"). The pieces are the training render's validation
split, or `validation`: renders of pianos held out of training (`pianolm data render
--instruments csound-gm iowa-steinway --val-fraction 1`), so that the best weights are chosen
on pianos the encoder never heard (`best_metric`). The dev set (../shared/devset) is measured
the same way; it is never trained on and never used to choose anything.

Crops and their targets come from examples.py, the loop's bookkeeping (resume, log, state.pt)
from loop.py; thresholds.py tunes roll decoding for a trained encoder (`tune-rolls`).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pianolm.export.encoders import ENCODERS
from pianolm.runtime.audio import normalise_peak, segment_audio
from pianolm.runtime.notes import Note
from pianolm.runtime.rolls import RollDecodeConfig, decode_rolls, join_segments

from .common import atomic_write_text, graceful_stop
from .evaluate import load_devset, mean_scores, score_notes
from .examples import SAMPLE_RATE, CropSource, dataset_entries, make_batch, piece_notes
from .loop import Meter, Run, open_run
from .targets import TargetConfig, roll_targets

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
    val_items: int = 8  # validation-split pieces scored at each validation (0: none), per root
    validation: str = ""  # comma-separated dataset roots to validate on ("": data_root's)
    best_metric: str = "onset_f"  # the validation score best.safetensors maximises
    devset: str | None = ""  # "" = default location if present; None or "none" = skip
    threads: int | None = None
    # Fine-tuning: start from another run's weights, and optionally train some roll heads only
    # (comma-separated, e.g. "velocity"): the rest stays frozen, so the other rolls, and the
    # embedding columns they make, do not move.
    init_from: str | None = None
    train_only: str = ""
    until_step: int | None = None  # stop (and save) after this step, as if interrupted
    # roll losses weighted in the sum trained on, e.g. "offset=3" (unnamed rolls weigh 1);
    # validation losses stay unweighted, so runs compare
    loss_weights: str = ""

    def loss_weight_map(self) -> dict[str, float]:
        return parse_loss_weights(self.loss_weights)

    def target_config(self, frames_per_second: float) -> TargetConfig:
        return TargetConfig(frames_per_second=frames_per_second, soft=self.soft_targets,
                            onset_width=self.onset_width, offset_width=self.offset_width,
                            velocity_radius=self.velocity_radius)


# ---------------------------------------------------------------------------------------------
# Loss


def parse_loss_weights(text: str) -> dict[str, float]:
    """"offset=3,frame=2" -> {"offset": 3.0, "frame": 2.0}; ValueError on anything else."""
    weights = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            weights[key] = float(value)
        except ValueError:
            weights[key] = -1.0
        if key not in ROLL_LOSS_KEYS or not weights[key] >= 0:
            raise ValueError(f"{item!r} is not ROLL=WEIGHT with ROLL one of "
                             f"{', '.join(ROLL_LOSS_KEYS)} and WEIGHT >= 0")
    return weights


def _loss_weights_arg(text: str) -> str:
    try:
        parse_loss_weights(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def roll_losses(rolls: Mapping[str, Tensor], targets: Mapping[str, Tensor],
                weights: Mapping[str, float] | None = None) -> dict[str, Tensor]:
    """BCE per roll (probabilities in, as the encoders output them) and their sum "loss",
    each roll's loss times its entry in `weights` (1 where it has none).

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
    w = weights or {}
    out["loss"] = sum(out[k] * w.get(k, 1.0) for k in ROLL_LOSS_KEYS)
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
    piano: str = ""  # the instrument it was rendered with ("" when unknown)


def _score_piece(piece: ScoredPiece, fps: float, target_cfg: TargetConfig,
                 roll_cfg: RollDecodeConfig) -> tuple[tuple[float, float, float],
                                                   dict[str, float], dict[str, float]]:
    """One piece's frame counts (tp, fp, fn), roll losses and note-level scores."""
    n = len(piece.rolls["onset"])
    tgt = roll_targets(piece.reference, n, target_cfg).as_dict()
    with torch.no_grad():
        lo = roll_losses({k: torch.from_numpy(v)[None] for k, v in piece.rolls.items()},
                         {k: torch.from_numpy(v)[None] for k, v in tgt.items()})
    losses = {("loss" if k == "loss" else f"loss_{k}"): float(v) for k, v in lo.items()}
    notes = score_notes(decode_rolls(piece.rolls, fps, roll_cfg), piece.reference)
    return frame_f1(piece.rolls["frame"], tgt["frame"]), losses, notes


def _pooled(rows: Sequence[tuple[tuple[float, float, float], dict[str, float],
                                 dict[str, float]]]) -> dict[str, float]:
    """Frame F1 over the pooled counts, means of the losses and note scores."""
    tp, fp, fn = (sum(r[0][i] for r in rows) for i in range(3))
    out = {"frame_f": _f1(tp, fp, fn), **mean_scores(r[1] for r in rows),
           **mean_scores(r[2] for r in rows)}
    out.pop("n_pred", None)
    out.pop("n_ref", None)
    return out


def score_pieces(pieces: Sequence[ScoredPiece], fps: float, target_cfg: TargetConfig,
                 roll_cfg: RollDecodeConfig) -> dict[str, float]:
    """Roll losses, frame F1 and note-level scores of roll decoding, over whole pieces."""
    return _pooled([_score_piece(p, fps, target_cfg, roll_cfg) for p in pieces])


PIANO_KEYS = ("onset_f", "onset_offset_f", "onset_offset_velocity_f", "frame_f")


def score_by_piano(pieces: Sequence[ScoredPiece], fps: float, target_cfg: TargetConfig,
                   roll_cfg: RollDecodeConfig) -> dict[str, Any]:
    """score_pieces over all pieces, plus "pianos": the note and frame F1s of each piano's
    (each piece is scored once)."""
    rows = [(p.piano, _score_piece(p, fps, target_cfg, roll_cfg)) for p in pieces]
    out: dict[str, Any] = _pooled([r for _, r in rows])
    pianos = sorted({piano for piano, _ in rows if piano})
    if pianos:
        out["pianos"] = {}
        for name in pianos:
            own = _pooled([r for piano, r in rows if piano == name])
            out["pianos"][name] = {k: own[k] for k in PIANO_KEYS}
    return out


def validation_pieces(encoder: nn.Module, data_root: str | os.PathLike, n_items: int,
                      split: str = "validation") -> list[ScoredPiece]:
    """The first `n_items` pieces of a split of one or more dataset roots (comma-separated),
    transcribed whole. A root's pieces alternate its pianos (dataset.plan_jobs), so the first
    few already cover each."""
    from pianolm.export.data.dataset import load_item

    pieces = []
    for root in str(data_root).split(","):
        for e in dataset_entries(root, split)[:n_items] if n_items else []:
            audio, _, _ = load_item(root, e)
            pieces.append(ScoredPiece(e["id"], transcribe_rolls(encoder, audio),
                                      piece_notes(root, e), e.get("instrument", "")))
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

    given = {"data_root": data_root, "encoder": encoder_name, "steps": steps, "batch": batch,
             "crop_seconds": crop_seconds, "lr": lr, **options}
    cfg, saved, out = open_run(EncoderTrainConfig, out_dir, resume, given, ("data_root",),
                               "a new encoder run needs data_root (--data)")

    # model and optimizer (seeded), then a resumed run's saved state on top
    torch.manual_seed(cfg.seed)
    model = encoder if encoder is not None else build_encoder(cfg.encoder)
    fps = float(model.frames_per_second)
    target_cfg = cfg.target_config(fps)
    n_samples = int(round(cfg.crop_seconds * SAMPLE_RATE))
    n_frames = int(model.num_frames(n_samples))
    if cfg.init_from and saved is None:
        load_init_weights(model, cfg.init_from)
    heads = [h for h in cfg.train_only.split(",") if h]
    loss_weights = cfg.loss_weight_map()
    params = head_parameters(model, heads) if heads else list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    run = Run(cfg, out, model, optimizer, rng, best_key="best_f", best=-1.0)
    run.start(saved, quiet)
    source = CropSource(cfg.data_root, "train", model.input_peak)

    model.train()
    meter = Meter()
    last_loss: float | None = None
    with graceful_stop() as flag:
        while run.step < run.stop_at and not flag.stop:
            # data: random crops of the training split and their roll targets
            lr_now = run.set_lr()
            wave, targets = make_batch(source, rng, cfg.batch, n_samples, n_frames, target_cfg,
                                       cfg.gain_db)
            # forward / backward
            losses = roll_losses(model(wave).rolls, targets, loss_weights)
            if heads:
                losses["loss"] = sum(losses[h] for h in heads)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            last_loss = float(losses["loss"].detach())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            optimizer.step()
            run.step += 1
            # log: means over the steps since the last train line
            meter.add(**{k: float(v.detach()) for k, v in losses.items()})
            if run.log_due():
                dt = meter.elapsed() / meter.steps
                run.log.write("train", run.step, **meter.means(), lr=lr_now, grad_norm=grad_norm,
                              sec_per_step=dt,
                              sec_per_step_per_crop_second=dt / (cfg.batch * cfg.crop_seconds))
                meter.reset()
            # validate
            if run.every(cfg.val_every):
                _validate(run, fps, target_cfg)
            # save
            if run.every(cfg.save_every):
                _save(run, target_cfg)
    if run.final_validation_due(cfg.val_every):
        _validate(run, fps, target_cfg)  # final scores for a finished run
    _save(run, target_cfg)
    return run.summary(val=run.last_val, last_loss=last_loss)


def _validate(run: Run, fps: float, target_cfg: TargetConfig) -> None:
    """Score whole validation pieces (best.safetensors on a new best onset F1), then the dev
    set (logged only)."""
    model, cfg = run.model, run.cfg
    model.eval()
    pieces = validation_pieces(model, cfg.validation or cfg.data_root, cfg.val_items)
    if pieces:
        scores = score_by_piano(pieces, fps, target_cfg, RollDecodeConfig())
        if run.validated(scores, cfg.best_metric):
            save_encoder(model, cfg.encoder, run.out, file=BEST_FILE)
    dev = devset_pieces(model, cfg.devset)
    if dev:
        run.log.write("devset", run.step, **score_pieces(dev, fps, target_cfg,
                                                          RollDecodeConfig()))
    model.train()


def _save(run: Run, target_cfg: TargetConfig) -> None:
    """state.pt, and the latest weights with encoder.json."""
    run.save_state()
    save_encoder(run.model, run.cfg.encoder, run.out,
                 {"step": run.step, "targets": asdict(target_cfg), "val": run.last_val,
                  "train_config": asdict(run.cfg)})


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
                       ("until-step", int), ("train-only", str), ("best-metric", str),
                       ("loss-weights", _loss_weights_arg)):
        p.add_argument(f"--{name}", type=kind)
    p.add_argument("--binary-targets", dest="soft_targets", action="store_false",
                   help="onsets-and-frames binary onset/offset targets instead of Kong's")
    p.add_argument("--validation", metavar="ROOTS",
                   help="comma-separated dataset roots whose validation split chooses the best "
                        "weights (default: --data's; renders of held-out pianos, ideally)")
    p.add_argument("--devset", help="dev-set folder to measure on (default ../shared/devset)")
    p.add_argument("--no-devset", dest="devset", action="store_const", const="none")
    p.add_argument("--init", dest="init_from", metavar="RUN",
                   help="start from another encoder run's weights (fine-tuning)")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    opts = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    summary = train_encoder(**opts)
    print(json.dumps(summary, default=str))
    return 0

