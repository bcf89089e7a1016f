"""Train one stage's decoder (onset | velocity | offset | flat) on precomputed embeddings.

    train_lm("onset", "work/emb/hppnet", "runs/lm-onset", preset="tiny", steps=20000, batch=8)
    pianolm train lm --stage onset --embeddings work/emb/hppnet --out runs/lm-onset
    pianolm train lm --out runs/lm-onset --resume
    pianolm train assemble --encoder-dir runs/hppnet --onset runs/lm-onset \
        --velocity runs/lm-velocity --offset runs/lm-offset --out runs/system

Examples: every 10 s segment of every training piece, for every precomputed grid shift
(embeddings.py), visited in shuffled epochs. A segment's tokens come from the piece's
pedal-extended notes through the runtime codec (`quantize`, `segment_notes`, `encode`), so
training and decoding share one definition; the `predicted` mask of `encode` is the loss mask
(cross-entropy on predicted positions only, teacher forcing). Before tokenizing, notes are made
to obey the decode grammar (one note per key and tick; a note ends no later than the next onset
of its key), so no target is a token the constrained decoder could never emit.

The encoder is frozen (one pass, embeddings.py). Exact, cheap augmentation on frozen
embeddings: the grid shifts, and feature dropout on the embeddings (`emb_dropout`).

Validation (every `val_every` steps): teacher-forced loss and token accuracy on validation
segments, and greedy decoding through runtime/decode.py with export/torch_backend.py's cached
session on a few validation segments, the upstream stages given from the reference (so each
stage is measured on its own): onset -> onset F1; velocity -> onset+offset+velocity F1 (true
onsets and offsets); offset -> onset+offset F1 (true onsets, carried notes included);
flat -> all three. Plus the share of segments whose predicted tokens are exactly right.

Run folder: state.pt (resume), decoder.safetensors + decoder.json (latest), best.safetensors
(lowest validation loss), log.jsonl.

Examples, batches and sampling live in examples.py, the loop's bookkeeping (resume, log,
state.pt) in loop.py; assembly.py puts trained stages and their encoder into a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from pianolm.export.decoder import CROSS_POSITIONS, PRESETS, TIME_HEADS, Decoder, DecoderConfig
from pianolm.export.torch_backend import CachedSession
from pianolm.runtime import vocab as V
from pianolm.runtime.decode import (
    OpenNote,
    RowSpec,
    decode_flat,
    decode_offsets,
    decode_onsets,
    decode_velocities,
)
from pianolm.runtime.notes import Note
from pianolm.runtime.tokens import ALL_STAGES, SegmentNotes, decode

from .common import atomic_write_text, graceful_stop
from .embeddings import load_embeddings_index, load_items
from .encoder import roll_config
from .evaluate import evaluate, mean_scores
from .examples import (
    EmbeddingStore,
    EpochSampler,
    Example,
    TrainBatch,
    build_examples,
    collate,
    spread_examples,
)
from .loop import Meter, Run, open_run

DECODER_FILE = "decoder.safetensors"
DECODER_JSON = "decoder.json"
BEST_FILE = "best.safetensors"
# A run's best weights in fp16, as committed to benchmarks/results/ (no optimizer state): enough
# for --init on a fresh machine, where the run folder itself is gone
COMMITTED_FILE = "best.fp16.safetensors"
# What each stage's greedy decode is scored by (the rest of a note comes from the reference)
BEST_BY = ("loss", "decode")
STAGE_METRICS = {"onset": ("onset",), "velocity": ("onset_offset_velocity",),
                 "offset": ("onset_offset",),
                 "flat": ("onset", "onset_offset", "onset_offset_velocity")}


@dataclass(frozen=True)
class LMTrainConfig:
    stage: str
    embeddings_dir: str
    out_dir: str = "runs/lm"
    preset: str = "tiny"
    steps: int = 20000
    batch: int = 8
    lr: float = 3e-4  # authors: 1e-4 at batch 5-8 on MAESTRO; small data and models take more
    weight_decay: float = 0.1
    warmup_steps: int = 300
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    shifts: tuple[float, ...] | None = None  # precomputed grid shifts to use (None: all)
    emb_dropout: float = 0.1  # dropout on the frozen embeddings (training only)
    train_split: str = "train"
    val_split: str = "validation"
    log_every: int = 20
    save_every: int = 500
    val_every: int = 1000
    val_segments: int = 64  # teacher-forced validation loss over this many segments
    decode_segments: int = 8  # greedy-decoded validation segments (0: none)
    threads: int | None = None
    until_step: int | None = None  # stop (and save) after this step, as if interrupted
    # Start a new run from another run's weights (its best), e.g. an LM pre-trained on oracle
    # embeddings (`embed --oracle`) fine-tuned on the real encoder's, or the velocity stage
    # from the onset stage, which has learned to find a time token's frames: same sizes.
    init_from: str | None = None
    # New runs: time-token embeddings start as the audio memory's position vectors of their
    # frames (align_time_embeddings), so aligning tokens with frames is one shared smooth map
    # to learn rather than 1001 separate embeddings.
    align_time_init: bool = True
    # Cross-attention alignment (DecoderConfig; docs/decoder.md): the authors' "token"
    # positions, or "time" with the look-ahead prior and/or the pointer time head.
    cross_positions: str = "token"
    look_ahead: bool = False
    time_head: str = "lm"
    # The stage's logits start from the encoder's rolls (export/roll_prior.py): "time"
    # positions, a pointer time head and a rolls encoder (hppnet) required
    roll_prior: bool = False
    prior_lr_scale: float = 0.0  # the prior's scales learn at this x lr (0: as calibrated)
    # Cross-entropy over the tokens the decode loop's grammar allows at each position (what
    # greedy decoding chooses among), not the whole vocabulary. A roll prior's terms rank
    # only allowed tokens (an earlier peak than the query's tick scores high, and the grammar
    # forbids it): over the whole vocabulary they cost ~11 nats at init and training spends
    # itself unlearning them.
    constrained_loss: bool = False
    # A new roll-prior stage's logits tempered to the lowest loss first (fit_prior_temperature)
    fit_temperature: bool = False
    # Which weights are best.safetensors: the lowest teacher-forced validation loss ("loss"),
    # or the best greedy-decode F1 of the stage's metric ("decode"; the start included)
    best_by: str = "loss"

    def __post_init__(self) -> None:
        if self.stage not in ALL_STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; expected one of {ALL_STAGES}")
        if self.best_by not in BEST_BY:
            raise ValueError(f"best_by {self.best_by!r}: choose from {list(BEST_BY)}")
        if self.best_by == "decode" and not self.decode_segments:
            raise ValueError("best_by 'decode' needs decode_segments > 0")


# ---------------------------------------------------------------------------------------------
# Loss


def lm_loss(decoder: Decoder, batch: TrainBatch) -> tuple[Tensor, Tensor]:
    """(mean cross-entropy over predicted positions, number of correct argmax predictions)."""
    logits = decoder(batch.inputs, batch.emb, query_ticks=batch.query_ticks)
    if not bool(batch.mask.any()):  # nothing predicted: a zero loss that still has a graph
        return logits.sum() * 0.0, torch.zeros((), dtype=torch.int64)
    sel = logits[batch.mask]
    tgt = batch.targets[batch.mask]
    if batch.allowed is not None:  # constrained_loss: the grammar's tokens only
        sel = sel.masked_fill(~batch.allowed[batch.mask], float("-inf"))
    return F.cross_entropy(sel.float(), tgt), (sel.argmax(-1) == tgt).sum()


# ---------------------------------------------------------------------------------------------
# Greedy decoding of one stage through the runtime loop


class StageBackend:
    """The runtime's Backend protocol over decoders alone (embeddings are precomputed):
    export/torch_backend.py's cached session, the reference for the exported graphs."""

    sample_rate = 16000
    segment_samples = 160000

    def __init__(self, decoders: Mapping[str, Decoder]) -> None:
        self.decoders = dict(decoders)
        self.stages = tuple(self.decoders)

    def encode(self, audio: np.ndarray) -> np.ndarray:  # pragma: no cover - not used here
        raise NotImplementedError("StageBackend decodes precomputed embeddings only")

    @torch.inference_mode()
    def start(self, stage: str, embeddings: np.ndarray) -> CachedSession:
        emb = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
        return CachedSession(self.decoders[stage], emb)


def _own_onsets(seg: SegmentNotes) -> list[tuple[int, int]]:
    return [(n.onset_tick - seg.start, n.pitch) for n in seg.own]


def greedy_tokens(stage: str, decoder: Decoder, embeddings: np.ndarray,
                  segments: Sequence[SegmentNotes], max_notes: int = 384) -> list[list[int]]:
    """Greedy, grammar-constrained tokens of `stage` per segment (after `sos task`), with the
    reference supplying what earlier stages would (onsets, carried notes). Comparable with
    `encode(stage, seg)[0][2:]`."""
    was_training = decoder.training
    decoder.eval()
    backend = StageBackend({stage: decoder})
    try:
        if stage == "onset":
            return decode_onsets(backend, embeddings, max_notes)
        onsets = [_own_onsets(s) for s in segments]
        if stage == "velocity":
            velocities = decode_velocities(backend, embeddings, onsets)
            return [[tok for (t, p), v in zip(on, vel)
                     for tok in (V.time_token(t), V.pitch_token(p), v)]
                    for on, vel in zip(onsets, velocities)]
        rows = [RowSpec(s.index, None, [OpenNote(-n.owner, n.pitch) for n in s.carried])
                for s in segments]
        if stage == "offset":
            return decode_offsets(backend, embeddings, rows, onsets)[0]
        return [st.tokens["flat"] for st in decode_flat(backend, embeddings, rows, max_notes)]
    finally:
        decoder.train(was_training)


def _segment_notes_local(seg: SegmentNotes, carried: bool) -> list[Note]:
    """Reference notes in segment-local seconds; offsets past the end clipped to 10 s, carried
    notes (if wanted) starting at 0."""
    out = [Note((n.onset_tick - seg.start) / 100, min(n.offset_tick - seg.start, 1000) / 100,
                n.pitch, n.velocity) for n in seg.own]
    if carried:
        out += [Note(0.0, min(n.offset_tick - seg.start, 1000) / 100, n.pitch, n.velocity)
                for n in seg.carried]
    return out


def predicted_notes(stage: str, tokens: Sequence[int], seg: SegmentNotes) -> list[Note]:
    """Decoded tokens -> segment-local notes, with the reference filling what the stage does
    not predict."""
    def off(o: int | None) -> float:
        return (V.SEGMENT_TICKS if o is None else o) / 100

    ref_own = _segment_notes_local(seg, carried=False)
    if stage == "onset":
        return [Note(t / 100, t / 100 + 0.1, p) for t, p in decode("onset", tokens)]
    if stage == "velocity":
        return [Note(r.onset, r.offset, r.pitch, v)
                for r, (_, _, v) in zip(ref_own, decode("velocity", tokens))]
    if stage == "offset":
        own, carried = decode("offset", tokens)
        vel = {(n.onset_tick - seg.start, n.pitch): n.velocity for n in seg.own}
        notes = [Note(t / 100, off(o), p, vel.get((t, p), 64)) for t, p, o in own]
        cvel = {n.pitch: n.velocity for n in seg.carried}
        return notes + [Note(0.0, off(o), p, cvel.get(p, 64)) for p, o in carried]
    own, carried = decode("flat", tokens)
    return ([Note(t / 100, off(o), p, v) for t, p, o, v in own]
            + [Note(0.0, off(o), p, v) for p, o, v in carried])


def decode_scores(stage: str, decoder: Decoder, examples: Sequence[Example],
                  store: EmbeddingStore, batch: int = 8) -> dict[str, float]:
    """Greedy decode `examples` and score them (segment-local, mean over segments)."""
    scores, exact = [], 0
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        emb = np.stack([store.get(e.item, e.shift, e.row) for e in chunk])
        segs = [e.segment for e in chunk]
        limit = min(384, 2 * max(len(s.own) + len(s.carried) for s in segs) + 16)
        for e, toks in zip(chunk, greedy_tokens(stage, decoder, emb, segs, limit)):
            exact += list(toks) == e.tokens[2:].tolist()
            ref = _segment_notes_local(e.segment, carried=stage in ("offset", "flat"))
            scores.append(evaluate(predicted_notes(stage, toks, e.segment), ref))
    out = mean_scores(scores)
    out["exact"] = exact / max(len(examples), 1)
    return out


@torch.no_grad()
def validation_loss(decoder: Decoder, examples: Sequence[Example], store: EmbeddingStore,
                    batch: int, grammar: str | None = None) -> dict[str, float]:
    was_training = decoder.training
    decoder.eval()
    total, correct, count = 0.0, 0, 0
    for i in range(0, len(examples), batch):
        chunk = collate(examples[i:i + batch], store, grammar)
        loss, right = lm_loss(decoder, chunk)
        n = int(chunk.mask.sum())
        total, correct, count = total + float(loss) * n, correct + int(right), count + n
    decoder.train(was_training)
    return {"val_loss": total / max(count, 1), "val_token_acc": correct / max(count, 1)}


@torch.no_grad()
def align_time_embeddings(decoder: Decoder, frames_per_second: float) -> None:
    """Initialise the embedding of time token t as the position vector the audio memory adds
    at t's frame (`audio_pe_proj(audio_pe[frame])`), rescaled to the embeddings' init scale.

    The decoder finds a note's audio by matching a time token's query against the frames'
    keys. With independent random time embeddings each of the 1001 must learn that on its
    own, and on CPU-sized data the decoder memorises its training segments first (seen: onset
    validation loss rising from step 300 while training loss fell). Tied to the frame's
    position vector, every time token shares one smooth structure from the start.
    """
    ticks = torch.arange(V.SEGMENT_TICKS + 1)
    frames = (ticks * frames_per_second / V.TICKS_PER_SECOND).round().long()
    frames = frames.clamp(max=decoder.audio_pe.shape[0] - 1)
    vectors = decoder.audio_pe_proj(decoder.audio_pe[frames])
    scale = decoder.tok_emb.weight.std() / vectors.std()
    decoder.tok_emb.weight[V.TIME_BASE:V.TIME_BASE + len(ticks)] = vectors * scale


# ---------------------------------------------------------------------------------------------
# Saving


def save_decoder(decoder: Decoder, folder: Path, meta: Mapping[str, Any],
                 file: str = DECODER_FILE) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}
    tmp = folder / (file + ".tmp")
    save_file(state, str(tmp), metadata={"stage": str(meta.get("stage", ""))})
    os.replace(tmp, folder / file)
    if file == DECODER_FILE:
        atomic_write_text(folder / DECODER_JSON, json.dumps(meta, indent=1, default=str) + "\n")


def load_decoder(folder: str | os.PathLike, best: bool = True
                 ) -> tuple[Decoder, dict[str, Any]]:
    """(decoder, decoder.json) of an LM run folder; `best`: best.safetensors if present. A
    folder of committed weights (decoder.json + best.fp16.safetensors) loads too, in fp32."""
    folder = Path(folder)
    meta = json.loads((folder / DECODER_JSON).read_text())
    decoder = Decoder(DecoderConfig.from_dict(meta["config"]))
    path = folder / (BEST_FILE if best and (folder / BEST_FILE).is_file() else DECODER_FILE)
    if not path.is_file() and (folder / COMMITTED_FILE).is_file():
        path = folder / COMMITTED_FILE
    weights = {k: v.float() if v.is_floating_point() else v
               for k, v in load_file(str(path)).items()}
    decoder.load_state_dict(weights, strict=True)
    return decoder.eval(), meta


ALIGNMENT_FIELDS = ("cross_positions", "look_ahead", "time_head", "roll_prior")


def load_init_decoder(decoder: Decoder, run: str, wanted: str) -> None:
    """Copy another run's best weights into `decoder` (--init): any stage, same sizes. The
    alignment options may differ (e.g. a time-aligned run from the authors' layout, or a roll
    prior's run from stages without one): the parameters only one side has (look-ahead
    slopes, the pointer head, the prior's scales) keep their init."""
    init, _ = load_decoder(run)
    if replace(init.cfg, **{k: getattr(decoder.cfg, k) for k in ALIGNMENT_FIELDS}) != decoder.cfg:
        raise ValueError(f"--init {run}: a decoder of another size or embedding width, not "
                         f"{wanted}")
    decoder.load_state_dict(init.state_dict(), strict=False)
    if decoder.prior is not None and init.prior is None:
        decoder.start_from_the_rolls()  # the prior decides its slots until training says not


def calibrate_prior(decoder: Decoder, index: dict[str, Any]) -> None:
    """A new roll-prior stage starts from the tuned thresholds of the encoder whose embeddings
    it trains on (its encoder.json, as `pianolm train tune-rolls` wrote them), when known."""
    folder = (index.get("source") or {}).get("encoder_dir")
    meta_path = Path(folder) / "encoder.json" if folder else None
    if meta_path is None or not meta_path.is_file():
        return
    rolls = roll_config(json.loads(meta_path.read_text()))
    decoder.prior.calibrate(rolls.onset_threshold, rolls.offset_threshold,
                            rolls.frame_threshold, rolls.velocity_curve)


# ---------------------------------------------------------------------------------------------
# Training


def fit_prior_temperature(decoder: Decoder, examples: Sequence[Example],
                          store: EmbeddingStore, batch: int, grammar: str | None) -> float:
    """Temper a new roll-prior stage's logits (RollPrior.temper) to the factor with the lowest
    loss on `examples`, from a halving grid: the calibrated terms are far sharper than the
    rolls are right, so cross-entropy would first spend its steps flattening them. With
    constrained_loss the prior alone scores the allowed tokens at the start, so greedy decoding
    does not change. Returns the factor."""
    def loss(factor: float) -> float:
        decoder.prior.temper(factor)
        value = validation_loss(decoder, examples, store, batch, grammar)["val_loss"]
        decoder.prior.temper(1.0 / factor)
        return value

    factors = [2.0 ** (-k / 2) for k in range(13)]  # 1 .. 1/64
    best = min(factors, key=loss)
    decoder.prior.temper(best)
    return best


def train_lm(stage: str | None = None, embeddings_dir: str | None = None,
             out_dir: str | os.PathLike = "runs/lm", preset: str | None = None,
             steps: int | None = None, batch: int | None = None, lr: float | None = None, *,
             resume: bool = False, quiet: bool = False, **options: Any) -> dict[str, Any]:
    """Train (or with resume=True continue) one stage's decoder; returns a summary dict.

    Arguments left None come from the saved run when resuming, else from LMTrainConfig's
    defaults; `options` are further LMTrainConfig fields (e.g. val_every=0, shifts=(0.0,)).
    """
    given = {"stage": stage, "embeddings_dir": embeddings_dir, "preset": preset,
             "steps": steps, "batch": batch, "lr": lr, **options}
    cfg, saved, out = open_run(LMTrainConfig, out_dir, resume, given,
                               ("stage", "embeddings_dir"),
                               "a new LM run needs stage and embeddings_dir")

    # data: every segment of every piece and grid shift; fixed validation subsets
    index = load_embeddings_index(cfg.embeddings_dir)
    dcfg = DecoderConfig.from_preset(
        cfg.preset, int(index["embed_dim"]),
        max_frames=max(1024, int(index["frames_per_segment"])),
        ticks_per_frame=round(V.TICKS_PER_SECOND / float(index["frames_per_second"])),
        cross_positions=cfg.cross_positions, look_ahead=cfg.look_ahead, time_head=cfg.time_head,
        roll_prior=cfg.stage if cfg.roll_prior else "none")
    train_items = load_items(cfg.embeddings_dir, cfg.train_split, index)
    val_items = load_items(cfg.embeddings_dir, cfg.val_split, index)
    train_ex, skipped = build_examples(train_items, cfg.stage, cfg.shifts, dcfg.max_seq_len)
    val_ex, _ = build_examples(val_items, cfg.stage, (0.0,), dcfg.max_seq_len)
    if not train_ex:
        raise ValueError(f"{cfg.embeddings_dir}: no {cfg.train_split} segments")
    train_store, val_store = EmbeddingStore(train_items), EmbeddingStore(val_items)
    val = _Validation(spread_examples(val_ex, cfg.val_segments),
                      spread_examples(val_ex, cfg.decode_segments), val_store,
                      {k: index.get(k) for k in ("encoder", "embed_dim", "frames_per_segment",
                                                 "frames_per_second", "source")})

    # model, optimizer, sampler (seeded), then a resumed run's saved state on top
    torch.manual_seed(cfg.seed)
    decoder = Decoder(dcfg)
    if cfg.align_time_init and saved is None and not cfg.init_from:
        align_time_embeddings(decoder, float(index["frames_per_second"]))
    # decay matrices and embeddings only, not norm gains or biases (the usual LM recipe)
    # A roll prior's few scales have a rate of their own (prior_lr_scale x the LM's): at 30x,
    # cross-entropy shrank them within 500 steps and the stage fell back towards the LM it
    # started from (engines/default/MODEL.md), so by default they stay as calibrated
    prior = {id(p) for p in decoder.prior.parameters()} if decoder.prior is not None else set()
    groups = [{"params": [p for p in decoder.parameters() if p.ndim >= 2],
               "weight_decay": cfg.weight_decay},
              {"params": [p for p in decoder.parameters() if p.ndim < 2 and id(p) not in prior],
               "weight_decay": 0.0}]
    if prior:
        groups.append({"params": list(decoder.prior.parameters()), "weight_decay": 0.0,
                       "lr_scale": cfg.prior_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(cfg.seed)
    sampler = EpochSampler(len(train_ex), rng)
    if saved is None and cfg.init_from:
        load_init_decoder(decoder, cfg.init_from, f"a {cfg.preset} one for "
                          f"{cfg.embeddings_dir}")
    tempered: float | None = None
    if saved is None and decoder.prior is not None:
        calibrate_prior(decoder, index)
        if cfg.fit_temperature:
            tempered = fit_prior_temperature(
                decoder, spread_examples(train_ex, cfg.val_segments), train_store, cfg.batch,
                cfg.stage if cfg.constrained_loss else None)
    by_loss = cfg.best_by == "loss"
    run = Run(cfg, out, decoder, optimizer, rng, best_key="best_loss" if by_loss else "best_f",
              best=float("inf") if by_loss else -1.0, lower_is_better=by_loss)
    run.start(saved, quiet)
    if saved is not None:
        sampler.load(saved["sampler"])
    else:
        run.log.write("data", 0, train_segments=len(train_ex), val_segments=len(val_ex),
                      skipped_too_long=skipped, parameters=sum(p.numel() for p in
                                                               decoder.parameters()))
        if tempered is not None:
            run.log.write("prior", 0, temper=tempered)
        if not by_loss and cfg.val_every:  # the start is a candidate too
            _validate(run, val)

    grammar = cfg.stage if cfg.constrained_loss else None
    decoder.train()
    meter = Meter()
    last_loss: float | None = None
    with graceful_stop() as flag:
        while run.step < run.stop_at and not flag.stop:
            # data: the next shuffled examples, feature dropout on their embeddings
            lr_now = run.set_lr()
            batch_ex = [train_ex[i] for i in sampler.take(cfg.batch)]
            data = collate(batch_ex, train_store, grammar)
            if cfg.emb_dropout:
                data.emb = F.dropout(data.emb, cfg.emb_dropout, training=True)
            # forward / backward
            loss, correct = lm_loss(decoder, data)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(decoder.parameters(),
                                                             cfg.grad_clip))
            optimizer.step()
            run.step += 1
            # log: means over the steps since the last train line
            last_loss = float(loss.detach())
            meter.add(tokens=data.inputs.numel(), loss=last_loss,
                      token_acc=int(correct) / max(int(data.mask.sum()), 1))
            if run.log_due():
                dt = meter.elapsed()
                run.log.write("train", run.step, **meter.means(), lr=lr_now, grad_norm=grad_norm,
                              steps_per_s=meter.steps / dt, tokens_per_s=meter.tokens / dt,
                              epoch=sampler.epoch)
                meter.reset()
            # validate
            if run.every(cfg.val_every):
                _validate(run, val)
            # save
            if run.every(cfg.save_every):
                _save(run, sampler, val.encoder_facts)
    if run.final_validation_due(cfg.val_every):
        _validate(run, val)
    _save(run, sampler, val.encoder_facts)
    return run.summary(last_loss=last_loss, val=run.last_val, train_segments=len(train_ex))


@dataclass
class _Validation:
    """What an LM run validates on: segments for the teacher-forced loss, segments to decode
    greedily, their embeddings, and the encoder facts that go into decoder.json."""

    loss_examples: list[Example]
    decode_examples: list[Example]
    store: EmbeddingStore
    encoder_facts: dict[str, Any]


def _validate(run: Run, val: _Validation) -> None:
    """Teacher-forced loss and greedy-decode scores (best.safetensors on a new lowest loss)."""
    if not val.loss_examples:
        return
    cfg, decoder = run.cfg, run.model
    scores = validation_loss(decoder, val.loss_examples, val.store, cfg.batch,
                             cfg.stage if cfg.constrained_loss else None)
    if val.decode_examples:
        t0 = time.perf_counter()
        decoded = decode_scores(cfg.stage, decoder, val.decode_examples, val.store, cfg.batch)
        wanted = STAGE_METRICS[cfg.stage]  # the other scores use reference values
        scores.update({f"decode_{k}": v for k, v in decoded.items()
                       if k[:-2] in wanted or k == "exact"})
        scores["decode_seconds"] = time.perf_counter() - t0
    metric = ("val_loss" if cfg.best_by == "loss"
              else f"decode_{STAGE_METRICS[cfg.stage][-1]}_f")
    if run.validated(scores, metric):
        save_decoder(decoder, run.out, _decoder_meta(run, val.encoder_facts), file=BEST_FILE)


def _save(run: Run, sampler: EpochSampler, encoder_facts: Mapping[str, Any]) -> None:
    """state.pt (with the sampler's place), and the latest weights with decoder.json."""
    run.save_state(sampler=sampler.state())
    save_decoder(run.model, run.out, _decoder_meta(run, encoder_facts))


def _decoder_meta(run: Run, encoder_facts: Mapping[str, Any]) -> dict[str, Any]:
    cfg = run.cfg
    return {"format": "pianolm-decoder", "version": 1, "stage": cfg.stage,
            "preset": cfg.preset, "config": run.model.cfg.to_dict(), "encoder": encoder_facts,
            "step": run.step, "val": run.last_val, "best_by": cfg.best_by, "best": run.best,
            "train_config": asdict(cfg)}


# ---------------------------------------------------------------------------------------------
# CLI


def add_cli(sub: argparse._SubParsersAction) -> None:
    S = argparse.SUPPRESS  # unset options stay unset: a resumed run keeps its saved values
    p = sub.add_parser("lm", help="train one stage's decoder on precomputed embeddings",
                       description=__doc__.split("\n\n")[0], argument_default=S)
    p.add_argument("--stage", choices=list(ALL_STAGES))
    p.add_argument("--embeddings", dest="embeddings_dir", help="embeddings folder (embed)")
    p.add_argument("--out", dest="out_dir", required=True, help="run folder")
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--resume", action="store_true", default=False,
                   help="continue the run in --out exactly where it stopped")
    for name, kind in (("steps", int), ("batch", int), ("lr", float), ("weight-decay", float),
                       ("warmup-steps", int), ("min-lr-ratio", float), ("grad-clip", float),
                       ("seed", int), ("emb-dropout", float), ("log-every", int),
                       ("save-every", int), ("val-every", int), ("val-segments", int),
                       ("decode-segments", int), ("threads", int), ("until-step", int)):
        p.add_argument(f"--{name}", type=kind)
    p.add_argument("--shifts", type=float, nargs="+", help="grid shifts to train on (all)")
    p.add_argument("--no-align-time-init", dest="align_time_init", action="store_false",
                   help="random time-token embeddings (see align_time_embeddings)")
    p.add_argument("--cross-positions", choices=list(CROSS_POSITIONS),
                   help="cross-attention positions: the authors' 'token' (default) or 'time' "
                        "(docs/decoder.md)")
    p.add_argument("--look-ahead", action="store_true",
                   help="time only: the look-ahead prior in every cross-attention layer")
    p.add_argument("--time-head", choices=list(TIME_HEADS),
                   help="time only: 'pointer' scores time tokens against the frames")
    p.add_argument("--roll-prior", action="store_true", default=None,
                   help="the stage's logits start from the encoder's rolls (time positions, "
                        "a pointer head and a rolls encoder; export/roll_prior.py)")
    p.add_argument("--prior-lr-scale", type=float, help="the roll prior's scales learn at this "
                   "x --lr (default 0: they stay as calibrated)")
    p.add_argument("--constrained-loss", action="store_true", default=None,
                   help="cross-entropy over the tokens the decode grammar allows only")
    p.add_argument("--fit-temperature", action="store_true", default=None,
                   help="a new roll-prior stage's logits tempered to the lowest loss first")
    p.add_argument("--best-by", choices=list(BEST_BY),
                   help="best.safetensors by validation loss (default) or greedy-decode F1")
    p.add_argument("--init", dest="init_from", metavar="RUN",
                   help="start from another run's best weights (same preset and embedding "
                        "width; any stage)")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    opts = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    if "shifts" in opts:
        opts["shifts"] = tuple(opts["shifts"])
    print(json.dumps(train_lm(**opts), default=str))
    return 0
