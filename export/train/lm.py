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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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
from pianolm.runtime.grammar import REPEAT_TICKS
from pianolm.runtime.notes import Note
from pianolm.runtime.tokens import (
    ALL_STAGES,
    SegmentNotes,
    TickNote,
    decode,
    encode,
    quantize,
    segment_notes,
)

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
from .embeddings import EmbeddingItem, load_embeddings_index, load_items
from .evaluate import evaluate, mean_scores

DECODER_FILE = "decoder.safetensors"
DECODER_JSON = "decoder.json"
BEST_FILE = "best.safetensors"
# A run's best weights in fp16, as committed to benchmarks/results/ (no optimizer state): enough
# for --init on a fresh machine, where the run folder itself is gone
COMMITTED_FILE = "best.fp16.safetensors"
# What each stage's greedy decode is scored by (the rest of a note comes from the reference)
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

    def __post_init__(self) -> None:
        if self.stage not in ALL_STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; expected one of {ALL_STAGES}")


# ---------------------------------------------------------------------------------------------
# Examples


def clean_ticknotes(notes: Sequence[TickNote]) -> list[TickNote]:
    """Make notes obey the decode grammar: onsets of one key at least REPEAT_TICKS apart (of
    those closer, the first; at one tick the loudest, then longest), and a note ends no later
    than the next onset of its key."""
    by_key: dict[int, list[TickNote]] = {}
    for n in notes:
        by_key.setdefault(n.pitch, []).append(n)
    out = []
    for key_notes in by_key.values():
        key_notes.sort(key=lambda n: (n.onset_tick, -n.velocity, -n.offset_tick))
        kept: list[TickNote] = []
        for n in key_notes:
            if kept and n.onset_tick - kept[-1].onset_tick < REPEAT_TICKS:
                continue
            kept.append(n)
        for a, b in zip(kept, kept[1:]):
            end = min(a.offset_tick, b.onset_tick)
            out.append(a if end == a.offset_tick else TickNote(a.onset_tick, end, a.pitch,
                                                                a.velocity))
        if kept:
            out.append(kept[-1])
    return sorted(out, key=lambda n: (n.onset_tick, n.pitch, n.offset_tick, n.velocity))


def shifted_segments(notes: Sequence[Note], shift: float, n_segments: int
                     ) -> list[SegmentNotes]:
    """The segments of the grid that starts `shift` seconds into the piece (0 <= shift < 10).

    Row k of the embeddings covers [shift + 10 k, shift + 10 k + 10). Ticks are moved so that a
    virtual segment 0 covers the time before the shifted grid: notes from it are carried into
    the first real segment, as they sound there. Returns those real segments (indices 1..S).
    """
    shift_ticks = int(round(shift * V.TICKS_PER_SECOND))
    if not 0 <= shift_ticks < V.SEGMENT_TICKS:
        raise ValueError(f"grid shift must lie in [0, 10) s, got {shift}")
    base = V.SEGMENT_TICKS - shift_ticks
    ticks = [TickNote(n.onset_tick + base, n.offset_tick + base, n.pitch, n.velocity)
             for n in clean_ticknotes(quantize(notes))]
    return segment_notes(ticks, n_segments + 1)[1:]


@dataclass
class Example:
    item: int  # index into the split's EmbeddingItems
    shift: float
    row: int  # row of the item's [S, T, E] embeddings
    segment: SegmentNotes
    tokens: np.ndarray  # int64 [L]
    predicted: np.ndarray  # bool [L]


def build_examples(items: Sequence[EmbeddingItem], stage: str, shifts: Sequence[float] | None,
                   max_len: int) -> tuple[list[Example], int]:
    """Every segment of every item and shift that has a token to predict; returns (examples,
    number skipped as longer than max_len)."""
    examples, skipped = [], 0
    for i, item in enumerate(items):
        for shift in sorted(item.files):
            if shifts is not None and not any(abs(shift - s) < 1e-6 for s in shifts):
                continue
            n = int(item.segments(shift).shape[0])
            for row, seg in enumerate(shifted_segments(item.notes, shift, n)):
                tokens, predicted = encode(stage, seg)
                if not any(predicted):  # e.g. velocity stage, no own notes: nothing to learn
                    continue
                if len(tokens) > max_len:
                    skipped += 1
                    continue
                examples.append(Example(i, shift, row, seg, np.asarray(tokens, np.int64),
                                        np.asarray(predicted, bool)))
    return examples, skipped


class EmbeddingStore:
    """Memory-mapped embeddings, one segment (row) at a time, as float32."""

    def __init__(self, items: Sequence[EmbeddingItem]) -> None:
        self.items = items
        self._open: dict[tuple[int, float], np.ndarray] = {}

    def get(self, item: int, shift: float, row: int) -> np.ndarray:
        key = (item, shift)
        if key not in self._open:
            self._open[key] = self.items[item].segments(shift)
        return np.asarray(self._open[key][row], dtype=np.float32)


@dataclass
class TrainBatch:
    """Teacher-forced inputs [B, L-1], targets [B, L-1], loss mask [B, L-1], embeddings
    [B, T, E], and the inputs' query ticks [B, L-1] (vocab.query_ticks: what the runtime feeds
    a time-aligned decoder)."""

    inputs: Tensor
    targets: Tensor
    mask: Tensor
    emb: Tensor
    query_ticks: Tensor


def collate(examples: Sequence[Example], store: EmbeddingStore) -> TrainBatch:
    """Right padding with pad tokens, masked out of the loss; a causal decoder never lets
    padding influence the real positions before it."""
    length = max(len(e.tokens) for e in examples)
    tokens = np.full((len(examples), length), V.PAD, np.int64)
    mask = np.zeros((len(examples), length), bool)
    for b, e in enumerate(examples):
        tokens[b, : len(e.tokens)] = e.tokens
        mask[b, : len(e.tokens)] = e.predicted
    emb = np.stack([store.get(e.item, e.shift, e.row) for e in examples])
    t = torch.from_numpy(tokens)
    return TrainBatch(t[:, :-1], t[:, 1:], torch.from_numpy(mask[:, 1:]), torch.from_numpy(emb),
                      torch.from_numpy(V.query_ticks(tokens[:, :-1])))


def lm_loss(decoder: Decoder, batch: TrainBatch) -> tuple[Tensor, Tensor]:
    """(mean cross-entropy over predicted positions, number of correct argmax predictions)."""
    logits = decoder(batch.inputs, batch.emb, query_ticks=batch.query_ticks)
    if not bool(batch.mask.any()):  # nothing predicted: a zero loss that still has a graph
        return logits.sum() * 0.0, torch.zeros((), dtype=torch.int64)
    sel = logits[batch.mask]
    tgt = batch.targets[batch.mask]
    return F.cross_entropy(sel.float(), tgt), (sel.argmax(-1) == tgt).sum()


class EpochSampler:
    """Shuffled passes over all examples; its state goes into state.pt."""

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        self.n, self.rng = n, rng
        self.order = rng.permutation(n)
        self.pos = 0
        self.epoch = 0

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= self.n:
                self.order, self.pos = self.rng.permutation(self.n), 0
                self.epoch += 1
            out.append(int(self.order[self.pos]))
            self.pos += 1
        return out

    def state(self) -> dict[str, Any]:
        return {"order": self.order.tolist(), "pos": self.pos, "epoch": self.epoch}

    def load(self, state: Mapping[str, Any]) -> None:
        self.order = np.asarray(state["order"], np.int64)
        self.pos, self.epoch = int(state["pos"]), int(state["epoch"])


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
                    batch: int) -> dict[str, float]:
    was_training = decoder.training
    decoder.eval()
    total, correct, count = 0.0, 0, 0
    for i in range(0, len(examples), batch):
        chunk = collate(examples[i:i + batch], store)
        loss, right = lm_loss(decoder, chunk)
        n = int(chunk.mask.sum())
        total, correct, count = total + float(loss) * n, correct + int(right), count + n
    decoder.train(was_training)
    return {"val_loss": total / max(count, 1), "val_token_acc": correct / max(count, 1)}


def _spread(examples: Sequence[Example], k: int) -> list[Example]:
    """k examples spread evenly over the list (deterministic)."""
    if k >= len(examples):
        return list(examples)
    idx = np.linspace(0, len(examples) - 1, k).round().astype(int)
    return [examples[i] for i in idx]


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


ALIGNMENT_FIELDS = ("cross_positions", "look_ahead", "time_head")


def load_init_decoder(decoder: Decoder, run: str, wanted: str) -> None:
    """Copy another run's best weights into `decoder` (--init): any stage, same sizes. The
    alignment options may differ (e.g. a time-aligned run from the authors' layout): the
    parameters only one side has (look-ahead slopes, the pointer head) keep their init."""
    init, _ = load_decoder(run)
    if replace(init.cfg, **{k: getattr(decoder.cfg, k) for k in ALIGNMENT_FIELDS}) != decoder.cfg:
        raise ValueError(f"--init {run}: a decoder of another size or embedding width, not "
                         f"{wanted}")
    decoder.load_state_dict(init.state_dict(), strict=False)


# ---------------------------------------------------------------------------------------------
# Training


def train_lm(stage: str | None = None, embeddings_dir: str | None = None,
             out_dir: str | os.PathLike = "runs/lm", preset: str | None = None,
             steps: int | None = None, batch: int | None = None, lr: float | None = None, *,
             resume: bool = False, quiet: bool = False, **options: Any) -> dict[str, Any]:
    """Train (or with resume=True continue) one stage's decoder; returns a summary dict.

    Arguments left None come from the saved run when resuming, else from LMTrainConfig's
    defaults; `options` are further LMTrainConfig fields (e.g. val_every=0, shifts=(0.0,)).
    """
    out = Path(out_dir)
    saved = load_state(out) if resume else None
    if resume and saved is None:
        print(f"{out}: nothing to resume, starting a new run", file=sys.stderr)
    given = {"stage": stage, "embeddings_dir": embeddings_dir, "preset": preset,
             "steps": steps, "batch": batch, "lr": lr, **options}
    given = {k: v for k, v in given.items() if v is not None}
    given["out_dir"] = str(out)
    if saved is None and not (given.get("stage") and given.get("embeddings_dir")):
        raise ValueError("a new LM run needs stage and embeddings_dir")
    cfg: LMTrainConfig = config_from(LMTrainConfig, saved["config"] if saved else {}, given)
    if "until_step" not in given:  # a stop point belongs to one invocation, not to the run
        cfg = replace(cfg, until_step=None)
    set_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)

    index = load_embeddings_index(cfg.embeddings_dir)
    dcfg = DecoderConfig.from_preset(
        cfg.preset, int(index["embed_dim"]),
        max_frames=max(1024, int(index["frames_per_segment"])),
        ticks_per_frame=round(V.TICKS_PER_SECOND / float(index["frames_per_second"])),
        cross_positions=cfg.cross_positions, look_ahead=cfg.look_ahead, time_head=cfg.time_head)
    train_items = load_items(cfg.embeddings_dir, cfg.train_split, index)
    val_items = load_items(cfg.embeddings_dir, cfg.val_split, index)
    train_ex, skipped = build_examples(train_items, cfg.stage, cfg.shifts, dcfg.max_seq_len)
    val_ex, _ = build_examples(val_items, cfg.stage, (0.0,), dcfg.max_seq_len)
    if not train_ex:
        raise ValueError(f"{cfg.embeddings_dir}: no {cfg.train_split} segments")
    train_store, val_store = EmbeddingStore(train_items), EmbeddingStore(val_items)
    val_loss_ex = _spread(val_ex, cfg.val_segments)
    val_decode_ex = _spread(val_ex, cfg.decode_segments)

    torch.manual_seed(cfg.seed)
    decoder = Decoder(dcfg)
    if cfg.align_time_init and saved is None and not cfg.init_from:
        align_time_embeddings(decoder, float(index["frames_per_second"]))
    # decay matrices and embeddings only, not norm gains or biases (the usual LM recipe)
    groups = [{"params": [p for p in decoder.parameters() if p.ndim >= 2],
               "weight_decay": cfg.weight_decay},
              {"params": [p for p in decoder.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(cfg.seed)
    sampler = EpochSampler(len(train_ex), rng)
    step, best_loss = 0, float("inf")
    last_val: dict[str, float] = {}
    if saved is None and cfg.init_from:
        load_init_decoder(decoder, cfg.init_from, f"a {cfg.preset} one for "
                          f"{cfg.embeddings_dir}")
    if saved is not None:
        decoder.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        restore_rng(saved["rng"], rng)
        sampler.load(saved["sampler"])
        step, best_loss = int(saved["step"]), float(saved["best_loss"])
        last_val = dict(saved.get("last_val", {}))
    log = JsonlLog(out, resume_step=step if saved is not None else None, quiet=quiet)
    if saved is None:
        log.write("data", 0, train_segments=len(train_ex), val_segments=len(val_ex),
                  skipped_too_long=skipped, parameters=sum(p.numel() for p in
                                                           decoder.parameters()))
    encoder_facts = {k: index.get(k) for k in ("encoder", "embed_dim", "frames_per_segment",
                                               "frames_per_second", "source")}

    def meta() -> dict[str, Any]:
        return {"format": "pianolm-decoder", "version": 1, "stage": cfg.stage,
                "preset": cfg.preset, "config": dcfg.to_dict(), "encoder": encoder_facts,
                "step": step, "val": last_val, "best_val_loss": best_loss,
                "train_config": asdict(cfg)}

    def save() -> None:
        atomic_torch_save({"step": step, "model": decoder.state_dict(),
                           "optimizer": optimizer.state_dict(), "rng": rng_state(rng),
                           "sampler": sampler.state(), "config": asdict(cfg),
                           "best_loss": best_loss, "last_val": last_val}, out / STATE_FILE)
        save_decoder(decoder, out, meta())

    def validate() -> None:
        nonlocal best_loss, last_val
        if not val_loss_ex:
            return
        last_val = validation_loss(decoder, val_loss_ex, val_store, cfg.batch)
        if val_decode_ex:
            t0 = time.perf_counter()
            scores = decode_scores(cfg.stage, decoder, val_decode_ex, val_store, cfg.batch)
            wanted = STAGE_METRICS[cfg.stage]  # the other scores use reference values
            last_val.update({f"decode_{k}": v for k, v in scores.items()
                             if k[:-2] in wanted or k == "exact"})
            last_val["decode_seconds"] = time.perf_counter() - t0
        log.write("val", step, **last_val)
        if last_val["val_loss"] < best_loss:
            best_loss = last_val["val_loss"]
            save_decoder(decoder, out, meta(), file=BEST_FILE)

    stop_at = min(cfg.steps, cfg.until_step) if cfg.until_step is not None else cfg.steps
    decoder.train()
    sums: dict[str, float] = {}
    last_loss: float | None = None
    t0, n_timed, tokens_seen = time.perf_counter(), 0, 0
    with graceful_stop() as flag:
        while step < stop_at and not flag.stop:
            lr_now = lr_at(step, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
            set_lr(optimizer, lr_now)
            batch_ex = [train_ex[i] for i in sampler.take(cfg.batch)]
            data = collate(batch_ex, train_store)
            if cfg.emb_dropout:
                data.emb = F.dropout(data.emb, cfg.emb_dropout, training=True)
            loss, correct = lm_loss(decoder, data)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(decoder.parameters(),
                                                             cfg.grad_clip))
            optimizer.step()
            step += 1
            n_timed += 1
            last_loss = float(loss.detach())
            n_pred = int(data.mask.sum())
            tokens_seen += data.inputs.numel()
            sums["loss"] = sums.get("loss", 0.0) + last_loss
            sums["token_acc"] = sums.get("token_acc", 0.0) + int(correct) / max(n_pred, 1)
            if step % cfg.log_every == 0 or step == stop_at:
                dt = time.perf_counter() - t0
                log.write("train", step, **{k: v / n_timed for k, v in sums.items()},
                          lr=lr_now, grad_norm=grad_norm, steps_per_s=n_timed / dt,
                          tokens_per_s=tokens_seen / dt, epoch=sampler.epoch)
                sums, t0, n_timed, tokens_seen = {}, time.perf_counter(), 0, 0
            if cfg.val_every and step % cfg.val_every == 0:
                validate()
            if cfg.save_every and step % cfg.save_every == 0:
                save()
    if step >= cfg.steps and cfg.val_every and step % cfg.val_every:
        validate()
    save()
    return {"step": step, "finished": step >= cfg.steps, "out_dir": str(out),
            "last_loss": last_loss, "val": last_val, "train_segments": len(train_ex)}


# ---------------------------------------------------------------------------------------------
# Assembling a TranscriptionSystem checkpoint


def assemble_system(encoder_dir: str | os.PathLike, decoder_dirs: Mapping[str, str | os.PathLike],
                    out_dir: str | os.PathLike, best: bool = True, encoder_best: bool = False,
                    force: bool = False) -> Path:
    """Encoder run + one LM run per stage -> a checkpoint folder (export/checkpoint.py).

    The decoders must have been trained on embeddings of these very encoder weights (checked
    through the embeddings index's sha256 unless `force`). Roll-decoding thresholds tuned for
    the encoder travel in the checkpoint's metadata ("rolls").
    """
    from pianolm.export.checkpoint import checkpoint_hash, save_system
    from pianolm.export.system import SystemConfig, TranscriptionSystem

    from .encoder import BEST_FILE as ENC_BEST
    from .encoder import ENCODER_FILE, load_encoder

    encoder, emeta = load_encoder(encoder_dir, best=encoder_best)
    enc_file = Path(encoder_dir) / (ENC_BEST if encoder_best and
                                    (Path(encoder_dir) / ENC_BEST).is_file() else ENCODER_FILE)
    enc_sha = checkpoint_hash(enc_file)
    stages = tuple(decoder_dirs)
    if set(stages) not in ({"onset", "velocity", "offset"}, {"flat"}):
        raise ValueError(f"need decoders for onset, velocity, offset (or flat), got {stages}")
    decoders, metas = {}, {}
    for stage, folder in decoder_dirs.items():
        dec, meta = load_decoder(folder, best=best)
        if meta["stage"] != stage:
            raise ValueError(f"{folder}: trained for stage {meta['stage']!r}, not {stage!r}")
        src = (meta.get("encoder") or {}).get("source") or {}
        if not force and src.get("sha256") and src["sha256"] != enc_sha:
            raise ValueError(f"{folder}: trained on embeddings of other encoder weights "
                             f"({src.get('encoder_dir')}); pass force=True to combine anyway")
        decoders[stage], metas[stage] = dec, meta
    hierarchical = stages != ("flat",)
    config = SystemConfig(encoder=emeta["encoder"],
                          decoder={s: decoders[s].cfg for s in (V.STAGES if hierarchical
                                                                 else ("flat",))},
                          hierarchical=hierarchical)
    system = TranscriptionSystem(config, encoder=encoder, decoder_device="meta")
    for stage, dec in decoders.items():
        system.decoders[stage].load_state_dict(dec.state_dict(), strict=True, assign=True)
        system.decoders[stage].reset_buffers()
    metadata = {"encoder_run": str(encoder_dir), "encoder_sha256": enc_sha,
                "encoder_step": emeta.get("step"), "rolls": emeta.get("rolls"),
                "targets": emeta.get("targets"),
                "decoders": {s: {"run": str(decoder_dirs[s]), "step": m.get("step"),
                                 "val": m.get("val"), "best": best} for s, m in metas.items()}}
    return save_system(system, out_dir, metadata=metadata)


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
    p.add_argument("--init", dest="init_from", metavar="RUN",
                   help="start from another run's best weights (same preset and embedding "
                        "width; any stage)")
    p.set_defaults(func=_run_train)

    a = sub.add_parser("assemble", help="encoder + stage decoders -> a system checkpoint")
    a.add_argument("--encoder-dir", required=True)
    for stage in ALL_STAGES:
        a.add_argument(f"--{stage}", metavar="DIR", help=f"{stage} LM run folder")
    a.add_argument("--out", required=True, help="checkpoint folder to write")
    a.add_argument("--last", action="store_true", help="latest decoder weights, not best")
    a.add_argument("--encoder-best", action="store_true", help="encoder best.safetensors")
    a.add_argument("--force", action="store_true", help="skip the encoder-weights check")
    a.set_defaults(func=_run_assemble)


def _run_train(args: argparse.Namespace) -> int:
    opts = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    if "shifts" in opts:
        opts["shifts"] = tuple(opts["shifts"])
    print(json.dumps(train_lm(**opts), default=str))
    return 0


def _run_assemble(args: argparse.Namespace) -> int:
    dirs = {s: getattr(args, s) for s in ALL_STAGES if getattr(args, s)}
    path = assemble_system(args.encoder_dir, dirs, args.out, best=not args.last,
                           encoder_best=args.encoder_best, force=args.force)
    print(f"wrote {path}")
    return 0
