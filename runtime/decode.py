"""The hierarchical greedy decode loop, for any backend (runtime/backend.py).

For one batch of segments: encoder once -> onset stage (greedy until eos or the note limit) ->
velocity stage (feed each known `time pitch`, read one velocity) -> offset stage (feed each known
`time pitch`, read one `off`; then the notes carried in from the previous segment). Every step is
grammar-constrained (runtime/grammar.py), so the output always parses and always ends.

Rows of a batch are segments, of one file or of several. A row's previous segment may sit in the
same batch (`RowSpec.prev`); its carried notes then become known while the offset stage runs and
are fed in rounds, in the order docs/tokens.md gives (owning segment descending, then pitch).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from . import vocab as V
from .backend import Backend, StageSession
from .grammar import FlatGrammar, OnsetGrammar, offset_mask, velocity_mask
from .notes import Note
from .tokens import SegmentResult, Stitcher, clip_to, decode, decode_onset

log = logging.getLogger(__name__)

DEFAULT_MAX_NOTES = 384  # per 10 s segment: ~38 notes/s, beyond dense piano playing


@dataclass(frozen=True, order=True)
class OpenNote:
    """A note still sounding at a segment's end. Sorts in carried-block order."""

    neg_owner: int  # minus the owning segment's index: later owners first
    pitch: int

    @property
    def owner(self) -> int:
        return -self.neg_owner


class Pending(NamedTuple):
    """A note waiting to be fed to the offset stage: `on pitch`, then its off is read."""

    on_token: int  # its onset's time token, or note_sustain for a carried note
    pitch: int
    on_tick: int  # 0 for a carried note
    limit_tick: int  # the key's next onset in the segment (the off must come by then), or -1
    owner: int  # the segment whose note it is


@dataclass
class RowSpec:
    """One row of a batch: which segment it is and where its carried notes come from."""

    segment: int  # the segment's index within its file
    prev: int | None = None  # row holding the previous segment of the same file, if in batch
    carry_in: list[OpenNote] = field(default_factory=list)  # open notes, when prev is None


@dataclass
class SegmentTokens:
    """What the decoders said about one segment: one token list per stage."""

    segment: int
    tokens: dict[str, Sequence[int]]  # lists from the loop; kept as arrays (transcriber.py)
    carry_out: list[OpenNote]  # notes still sounding at the segment's end


class ActiveRows:
    """A stage session seen at full batch width while finished rows drop out of it.

    The loop always feeds [B, n] chunks. When the backend can drop rows (the optional
    `StageSession.keep`), retired rows are cut from its cache and stop costing work; otherwise
    they keep riding along as masked padding. Either way the logits of live rows are the same:
    a row's result never depends on the rest of its batch.
    """

    def __init__(self, session: StageSession, batch: int) -> None:
        self.session = session
        self.batch = batch
        self.active = np.arange(batch)  # full-batch indices of the rows the session still holds
        self.can_drop = callable(getattr(session, "keep", None))

    def retire(self, done: np.ndarray) -> None:
        """done: bool [B]; rows marked done will never be fed again."""
        keep = ~np.asarray(done)[self.active]
        if not self.can_drop or keep.all() or not keep.any():
            return
        self.session.keep(np.flatnonzero(keep))
        self.active = self.active[keep]

    def step(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self._widen(self.session.step(*self._narrow(tokens, mask)))

    def step_all(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """StageSession.step_all at full batch width: [B, n, vocab]."""
        return self._widen(self.session.step_all(*self._narrow(tokens, mask)))

    def retract(self, drop: np.ndarray) -> None:
        self.session.retract(np.asarray(drop)[self.active])

    def _narrow(self, tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(self.active) < self.batch:
            dropped = np.ones(self.batch, dtype=bool)
            dropped[self.active] = False
            if mask[dropped].any():
                raise RuntimeError("decode loop fed a row it had retired")
        return tokens[self.active], mask[self.active]

    def _widen(self, logits: np.ndarray) -> np.ndarray:
        full = np.zeros((self.batch, *logits.shape[1:]), dtype=logits.dtype)
        full[self.active] = logits
        return full


def argmax_allowed(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    return np.where(allowed, logits, -np.inf).argmax(axis=1)


def start_stage(backend: Backend, stage: str, embeddings: np.ndarray) -> tuple[ActiveRows,
                                                                         np.ndarray]:
    """Open a stage session and feed its prompt `sos task`; returns it and the prompt's logits."""
    batch = len(embeddings)
    session = ActiveRows(backend.start(stage, embeddings), batch)
    tokens = np.tile(np.array([[V.SOS, V.TASK_TOKEN[stage]]], dtype=np.int64), (batch, 1))
    return session, session.step(tokens, np.ones_like(tokens, dtype=bool))


def emit(logits: np.ndarray, grammar: OnsetGrammar | FlatGrammar, out: list[list[int]]
         ) -> tuple[np.ndarray, np.ndarray]:
    """One greedy token per unfinished row: the grammar-constrained argmax, appended to the
    row's tokens and taken by the grammar. Returns the rows that were unfinished, and the
    tokens [B]."""
    live = ~grammar.done
    chosen = argmax_allowed(logits, grammar.mask())
    for row in np.flatnonzero(live):
        out[row].append(int(chosen[row]))
    grammar.update(chosen)
    return live, chosen


def _greedy(backend: Backend, embeddings: np.ndarray, stage: str,
            grammar: OnsetGrammar | FlatGrammar) -> list[list[int]]:
    """Free-running greedy decode until every row ends (eos, or the grammar's note limit)."""
    session, logits = start_stage(backend, stage, embeddings)
    out: list[list[int]] = [[] for _ in range(len(embeddings))]
    while True:
        live, chosen = emit(logits, grammar, out)
        if grammar.done.all():
            return out
        session.retire(grammar.done)
        fed = np.where(live, chosen, V.PAD)[:, None]
        logits = session.step(fed, (live & ~grammar.done)[:, None])


def decode_onsets(backend: Backend, embeddings: np.ndarray, max_notes: int) -> list[list[int]]:
    """Onset stage: returns each row's tokens after `sos task_onset`, eos included."""
    return _greedy(backend, embeddings, "onset", OnsetGrammar(len(embeddings), max_notes))


def _note_chunk(prev: np.ndarray, on: np.ndarray, pitch: np.ndarray, fed: np.ndarray):
    """The 3-token chunk `previous prediction, on, pitch`; rows not fed get masked padding.
    A row's first chunk has no previous prediction (prev == PAD): that slot is masked too."""
    tokens = np.stack([prev, on, pitch], axis=1).astype(np.int64)
    mask = np.stack([fed & (prev != V.PAD), fed, fed], axis=1)
    return np.where(mask, tokens, V.PAD), mask


def decode_velocities(backend: Backend, embeddings: np.ndarray,
                      notes: list[list[tuple[int, int]]]) -> list[list[int]]:
    """Velocity stage: one velocity token per known (tick, pitch), fed in order."""
    batch = len(embeddings)
    session, _ = start_stage(backend, "velocity", embeddings)
    out: list[list[int]] = [[] for _ in range(batch)]
    prev = np.full(batch, V.PAD)
    for i in range(max((len(n) for n in notes), default=0)):
        fed = np.array([i < len(n) for n in notes])
        session.retire(~fed)
        on = np.array([V.time_token(n[i][0]) if f else V.PAD for n, f in zip(notes, fed)])
        pitch = np.array([V.pitch_token(n[i][1]) if f else V.PAD for n, f in zip(notes, fed)])
        logits = session.step(*_note_chunk(prev, on, pitch, fed))
        chosen = argmax_allowed(logits, velocity_mask(batch))
        for row in np.flatnonzero(fed):
            out[row].append(int(chosen[row]))
        prev = np.where(fed, chosen, V.PAD)
    return out


def _next_onset_of_same_key(notes: list[tuple[int, int]]) -> list[int]:
    """For each note, the tick of the next note of the same key in the segment, or -1."""
    limit, seen = [-1] * len(notes), {}
    for i in range(len(notes) - 1, -1, -1):
        tick, pitch = notes[i]
        limit[i] = seen.get(pitch, -1)
        seen[pitch] = tick
    return limit


def decode_offsets(backend: Backend, embeddings: np.ndarray, rows: list[RowSpec],
                   notes: list[list[tuple[int, int]]]
                   ) -> tuple[list[list[int]], list[list[OpenNote]]]:
    """Offset stage: own notes first (every row in parallel), then carried notes in rounds.

    Returns each row's offset-stage tokens after `sos task_offset` (`on pitch off` per note) and
    the notes still sounding at each row's end.
    """
    batch = len(rows)
    session, _ = start_stage(backend, "offset", embeddings)
    out: list[list[int]] = [[] for _ in range(batch)]
    carry_out: list[list[OpenNote]] = [[] for _ in range(batch)]
    first_onset = [{p: t for t, p in reversed(n)} for n in notes]  # key -> its first onset tick
    successor = {spec.prev: r for r, spec in enumerate(rows) if spec.prev is not None}
    queues: list[list[Pending]] = []  # per row, the notes still to feed
    for r, (spec, own) in enumerate(zip(rows, notes)):
        limits = _next_onset_of_same_key(own)
        queue = [Pending(V.time_token(t), p, t, lim, spec.segment)
                 for (t, p), lim in zip(own, limits)]
        queue += _carried_entries(sorted(spec.carry_in), first_onset[r])
        queues.append(queue)
    own_left = [len(n) for n in notes]
    # A row's own notes that sustain reach its successor sorted by pitch, so they are held
    # back until the row has decided all of its own notes.
    held: list[list[OpenNote]] = [[] for _ in range(batch)]
    _release_finished_own(own_left, held, successor, queues, first_onset)
    prev = np.full(batch, V.PAD)
    while True:
        fed = np.array([bool(q) for q in queues])
        if not fed.any():
            # Every chain starts at a row with no predecessor in the batch, so an empty round
            # means every row has fed all its notes.
            return out, carry_out
        session.retire(_finished(rows, fed))
        heads = [q.pop(0) if q else None for q in queues]
        on = np.array([h.on_token if h else V.PAD for h in heads])
        pitch = np.array([V.pitch_token(h.pitch) if h else V.PAD for h in heads])
        logits = session.step(*_note_chunk(prev, on, pitch, fed))
        on_tick = np.array([h.on_tick if h else 0 for h in heads])
        limit = np.array([h.limit_tick if h else -1 for h in heads])
        chosen = argmax_allowed(logits, offset_mask(on_tick, limit))
        for r in np.flatnonzero(fed):
            head = heads[r]
            out[r] += [head.on_token, V.pitch_token(head.pitch), int(chosen[r])]
            own = head.on_token != V.NOTE_SUSTAIN
            own_left[r] -= own
            if chosen[r] == V.NOTE_SUSTAIN:
                open_note = OpenNote(-head.owner, head.pitch)
                carry_out[r].append(open_note)
                if own:
                    held[r].append(open_note)
                elif r in successor:  # already in carried-block order
                    nxt = successor[r]
                    queues[nxt] += _carried_entries([open_note], first_onset[nxt])
        _release_finished_own(own_left, held, successor, queues, first_onset)
        prev = np.where(fed, chosen, prev)


def _finished(rows: list[RowSpec], fed: np.ndarray) -> np.ndarray:
    """Rows that will never be fed again: nothing queued, and no predecessor in the batch that
    could still pass them a carried note (its own chain finished)."""
    done: dict[int, bool] = {}

    def finished(r: int) -> bool:
        if r not in done:
            prev = rows[r].prev
            done[r] = not fed[r] and (prev is None or finished(prev))
        return done[r]

    return np.array([finished(r) for r in range(len(rows))])


def _release_finished_own(own_left, held, successor, queues, first_onset) -> None:
    """Pass the sustaining own notes of rows that decided all their own notes to successors."""
    for r, waiting in enumerate(held):
        if own_left[r] == 0 and waiting and r in successor:
            nxt = successor[r]
            queues[nxt] += _carried_entries(sorted(waiting), first_onset[nxt])
            waiting.clear()


def _carried_entries(notes: list[OpenNote], first_onset: dict[int, int]) -> list[Pending]:
    """Queue entries for carried notes. A key struck again at tick 0 ends the carried note at
    the segment's start: it is not fed (training data never holds such a carried note)."""
    return [Pending(V.NOTE_SUSTAIN, o.pitch, 0, first_onset.get(o.pitch, -1), o.owner)
            for o in notes if first_onset.get(o.pitch) != 0]


SCHEDULES = ("auto", "concurrent", "sequential")  # of the velocity and offset stages


def concurrent_by_default(backend: str, threads: int | None, cores: int | None = None) -> bool:
    """The "auto" schedule: run the velocity and offset stages side by side only where the two
    sessions do not compete for the same cores: on a GPU, or on a CPU with `threads` per
    session set and room for twice that. ONNX Runtime's default gives each session every core,
    and two sessions on shared cores only split the memory bandwidth a step is bound by (2
    cores, small preset: 3.96 s concurrent vs 3.46 s sequential, README "Benchmark")."""
    if backend in ("cuda", "tensorrt"):
        return True
    return threads is not None and 2 * threads <= (cores or os.cpu_count() or 1)


def decode_batch(backend: Backend, audio: np.ndarray, rows: list[RowSpec],
                 max_notes: int = DEFAULT_MAX_NOTES, concurrent: bool = True
                 ) -> list[SegmentTokens]:
    """Decode one batch of segments [B, segment_samples] through all stages.

    The velocity and offset stages need only the onset stage's notes, not each other: with
    `concurrent` they run side by side (a second thread; backends release the GIL while a graph
    runs), so the critical path is the onset stage plus the longer of the two.
    """
    embeddings = backend.encode(audio)
    if backend.stages == ("flat",):
        return decode_flat(backend, embeddings, rows, max_notes)
    onsets = decode_onsets(backend, embeddings, max_notes)
    notes = [decode_onset(t) for t in onsets]
    for spec, n in zip(rows, notes):
        if len(n) >= max_notes:
            log.warning("segment %d reached the limit of %d notes", spec.segment, max_notes)
    if concurrent:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(decode_velocities, backend, embeddings, notes)
            offsets, carry_out = decode_offsets(backend, embeddings, rows, notes)
            velocities = pending.result()
    else:
        velocities = decode_velocities(backend, embeddings, notes)
        offsets, carry_out = decode_offsets(backend, embeddings, rows, notes)
    return [SegmentTokens(spec.segment, {"onset": on, "velocity": _with_velocities(n, vel),
                                         "offset": off}, co)
            for spec, on, n, vel, off, co in zip(rows, onsets, notes, velocities, offsets,
                                                 carry_out)]


def _with_velocities(notes: list[tuple[int, int]], velocities: list[int]) -> list[int]:
    out = []
    for (tick, pitch), vel in zip(notes, velocities):
        out += [V.time_token(tick), V.pitch_token(pitch), vel]
    return out


def decode_flat(backend: Backend, embeddings: np.ndarray, rows: list[RowSpec],
                max_notes: int) -> list[SegmentTokens]:
    """The flattened baseline: one decoder predicts `on pitch off velocity` for every note."""
    out = _greedy(backend, embeddings, "flat", FlatGrammar(len(rows), max_notes))
    return [SegmentTokens(spec.segment, {"flat": toks}, []) for spec, toks in zip(rows, out)]


class FileNotes:
    """One file's notes, built as its decoded segments arrive in order (tokens.Stitcher), so a
    long file keeps its notes, not every segment's tokens, until it ends."""

    def __init__(self) -> None:
        self.stitcher = Stitcher()
        self.last: SegmentResult | None = None  # held back: it may be the end-aligned tail

    def push(self, seg: SegmentTokens) -> None:
        if self.last is not None:
            self.stitcher.push(self.last)
        self.last = segment_result(seg)

    def finish(self, end: float | None = None, tail_start: float | None = None) -> list[Note]:
        """The file's notes. With `end` (the audio's length in seconds), notes lie within the
        audio: the last segment's padding holds no onsets, and offsets are cut at the end.
        With `tail_start` (seconds), the last segment is the end-aligned one
        (audio.tail_start), decoded on its own from there and merged once with the segments
        before it (Stitcher.finish_tail)."""
        if self.last is not None and tail_start is not None and end is not None \
                and self.stitcher.segments:
            notes = self.stitcher.finish_tail(self.last, tail_start, end)
        else:
            if self.last is not None:
                self.stitcher.push(self.last)
            notes = self.stitcher.finish(end)
        self.last = None
        return notes if end is None else clip_to(notes, end)


def segment_result(seg: SegmentTokens) -> SegmentResult:
    """What one segment's tokens decode to, through the codec."""
    if "flat" in seg.tokens:
        return SegmentResult.from_flat(decode("flat", seg.tokens["flat"]))
    return SegmentResult.from_stages(*(decode(stage, seg.tokens[stage]) for stage in V.STAGES))


def to_notes(segments: list[SegmentTokens], end: float | None = None,
             tail_start: float | None = None) -> list[Note]:
    """One file's decoded segments (in order) -> its notes (FileNotes, all at once)."""
    notes = FileNotes()
    for seg in segments:
        notes.push(seg)
    return notes.finish(end, tail_start)
