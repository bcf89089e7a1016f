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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple, Protocol

import numpy as np

from . import vocab as V
from .backend import Backend, StageSession
from .grammar import (
    FlatGrammar,
    OnsetGrammar,
    next_onset_of_same_key,
    offset_mask,
    velocity_mask,
)
from .manifest import Manifest, ManifestError
from .notes import Note
from .rolls import RollDecodeConfig
from .speculative import (
    NOTE_DRAFT,
    ONSET_DRAFT,
    Draft,
    FlatDraft,
    RollDraft,
    SpeculativeStats,
    as_the_prior_reads,
    continuation,
)
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
            grammar: OnsetGrammar | FlatGrammar, stats: SpeculativeStats) -> list[list[int]]:
    """Free-running greedy decode until every row ends (eos, or the grammar's note limit)."""
    session, logits = start_stage(backend, stage, embeddings)
    stats.calls += 1
    out: list[list[int]] = [[] for _ in range(len(embeddings))]
    while True:
        live, chosen = emit(logits, grammar, out)
        if grammar.done.all():
            stats.tokens += sum(map(len, out))
            return out
        session.retire(grammar.done)
        fed = np.where(live, chosen, V.PAD)[:, None]
        logits = session.step(fed, (live & ~grammar.done)[:, None])
        stats.calls += 1


def decode_onsets(backend: Backend, embeddings: np.ndarray, max_notes: int,
                  drafts: Sequence[Draft] | None = None, stats: SpeculativeStats | None = None,
                  max_draft: int = ONSET_DRAFT) -> list[list[int]]:
    """Onset stage: returns each row's tokens after `sos task_onset`, eos included.

    With `drafts` (one per row), speculative (_speculate): each row's draft tokens continue its
    grammar state (speculative.continuation). The tokens are greedy decoding's, whatever the
    drafts.
    """
    stats = SpeculativeStats() if stats is None else stats
    grammar = OnsetGrammar(len(embeddings), max_notes)
    if drafts is None:
        return _greedy(backend, embeddings, "onset", grammar, stats)
    return _speculate(backend, embeddings, "onset", grammar, stats, max_draft,
                      lambda r, out, k: continuation(drafts[r].onsets, grammar, r, k))


def next_window(kept: np.ndarray, max_draft: int) -> np.ndarray:
    """How much each row drafts in its next call: twice what it last kept, 1..max_draft."""
    return np.clip(2 * kept, 1, max_draft)


def _speculate(backend: Backend, embeddings: np.ndarray, stage: str,
               grammar: OnsetGrammar | FlatGrammar, stats: SpeculativeStats, max_draft: int,
               propose: Callable[[int, list[int], int], list[int]]) -> list[list[int]]:
    """Speculative greedy decode: each call feeds the token greedy decoding chose, then up to k
    draft tokens (`propose(row, its tokens so far, k)`), and keeps the draft while the
    grammar-constrained argmax agrees; the rest is retracted. k is twice what the row last
    kept, between 1 and max_draft."""
    batch = len(embeddings)
    session, logits = start_stage(backend, stage, embeddings)
    stats.calls += 1
    out: list[list[int]] = [[] for _ in range(batch)]
    k = np.full(batch, 2)
    while True:
        # the token greedy decoding picks here (a rejected draft's replacement, too)
        live, chosen = emit(logits, grammar, out)
        if grammar.done.all():
            stats.tokens += sum(map(len, out))
            return out
        session.retire(grammar.done)
        # one call: the chosen token, then each row's draft
        fed = live & ~grammar.done
        guesses = [propose(r, out[r], int(k[r])) if fed[r] else [] for r in range(batch)]
        width = 1 + max(map(len, guesses))
        tokens = np.full((batch, width), V.PAD, dtype=np.int64)
        mask = np.zeros((batch, width), dtype=bool)
        tokens[:, 0], mask[:, 0] = np.where(fed, chosen, V.PAD), fed
        for r, guess in enumerate(guesses):
            tokens[r, 1:1 + len(guess)], mask[r, 1:1 + len(guess)] = guess, True
        every = session.step_all(tokens, mask)
        stats.calls += 1
        stats.drafted += int(mask[:, 1:].sum())
        # keep each row's draft while the grammar-constrained argmax agrees with it
        kept, agreeing = fed.astype(np.int64), fed.copy()
        for i in range(1, width):
            if not (agreeing & mask[:, i]).any():
                break
            predicted = argmax_allowed(every[:, i - 1], grammar.mask())
            agreeing &= mask[:, i] & (predicted == tokens[:, i])
            for row in np.flatnonzero(agreeing):
                out[row].append(int(tokens[row, i]))
            grammar.update(np.where(agreeing, tokens[:, i], V.PAD))
            kept += agreeing
        stats.accepted += int((kept - fed).sum())
        session.retract(width - kept)
        logits = every[np.arange(batch), np.maximum(kept - 1, 0)]
        k = next_window(kept, max_draft)


@dataclass
class Known:
    """A note whose `on pitch` the velocity or offset stage feeds, and what it may predict."""

    on_token: int
    pitch_token: int
    allowed: np.ndarray  # bool [vocab]: the grammar's mask for its prediction


def verify_notes(session: ActiveRows, prev: np.ndarray, windows: list[list[Known]],
                 guesses: list[list[int]], stats: SpeculativeStats
                 ) -> list[tuple[list[int], int]]:
    """One call over each row's window of known notes; returns per row the predictions at
    every note of its window and how many of them are final: as many as greedy decoding
    would have made by then.

    Row r feeds `prev on_1 pitch_1 g_1 on_2 pitch_2 g_2 ... on_m pitch_m`: its previous
    prediction (PAD: none), then each note with guesses[r][j] standing in for the prediction
    at note j (m = 1: the plain greedy chunk `prev on pitch`). The predictions are read after
    each pitch; a row keeps them up to and including the first that differs from its guess
    (the greedy token there), and the positions after it are retracted. A window's last guess
    is never fed. Rows with an empty window wait (all padding).
    """
    batch = len(windows)
    width = 3 * max(map(len, windows))
    tokens = np.full((batch, width), V.PAD, dtype=np.int64)
    mask = np.zeros((batch, width), dtype=bool)
    for r, window in enumerate(windows):
        if not window:
            continue
        row = [int(prev[r])]
        for j, note in enumerate(window):
            row += [note.on_token, note.pitch_token] + ([guesses[r][j]] if j + 1 < len(window)
                                                         else [])
        tokens[r, :len(row)], mask[r, :len(row)] = row, True
        mask[r, 0] = prev[r] != V.PAD
    tokens[~mask] = V.PAD
    if width == 3:
        every = session.step(tokens, mask)[:, None]
    else:
        every = session.step_all(tokens, mask)
        stats.drafted += sum(max(len(w) - 1, 0) for w in windows)
    stats.calls += 1
    out: list[tuple[list[int], int]] = []
    drop = np.zeros(batch, dtype=np.int64)
    for r, window in enumerate(windows):
        at = [2 + 3 * j for j in range(len(window))] if width > 3 else [0] * len(window)
        predicted = [int(np.where(note.allowed, every[r, i], -np.inf).argmax())
                     for note, i in zip(window, at)]
        kept = next((j + 1 for j in range(len(window) - 1) if predicted[j] != guesses[r][j]),
                    len(window))
        stats.accepted += max(kept - 1, 0)
        stats.tokens += kept if window else 0
        drop[r] = width - 3 * kept  # a waiting row: its padding, all of it
        out.append((predicted, kept if window else 0))
    if width > 3:
        session.retract(drop)
    return out


def decode_velocities(backend: Backend, embeddings: np.ndarray,
                      notes: list[list[tuple[int, int]]], drafts: Sequence[Draft] | None = None,
                      stats: SpeculativeStats | None = None, max_draft: int = NOTE_DRAFT
                      ) -> list[list[int]]:
    """Velocity stage: one velocity token per known (tick, pitch), fed in order.

    With `drafts`, parallel (Jacobi): each call verifies up to k notes at once, guessing each
    velocity: first the draft's, then what the last call predicted there. k is twice what the
    row last kept, between 1 and max_draft.
    """
    stats = SpeculativeStats() if stats is None else stats
    batch = len(embeddings)
    session, _ = start_stage(backend, "velocity", embeddings)
    stats.calls += 1
    allowed = velocity_mask(1)[0]
    known = [[Known(V.time_token(t), V.pitch_token(p), allowed) for t, p in n] for n in notes]
    guesses = [[d.velocity(t, p) for t, p in n] for d, n in zip(drafts, notes)] if drafts \
        else [[V.PAD] * len(n) for n in notes]
    out: list[list[int]] = [[] for _ in range(batch)]
    prev = np.full(batch, V.PAD)
    k = np.full(batch, 1 if drafts is None else 2)
    while True:
        windows = [kn[len(o):len(o) + int(w)] for kn, o, w in zip(known, out, k)]
        if not any(windows):
            return out
        session.retire(np.array([not w for w in windows]))
        at = [len(o) for o in out]
        verified = verify_notes(session, prev, windows, [g[a:] for g, a in zip(guesses, at)],
                                stats)
        for r, (predicted, kept) in enumerate(verified):
            if kept:
                guesses[r][at[r]:at[r] + len(predicted)] = predicted  # Jacobi: the next guesses
                out[r] += predicted[:kept]
                prev[r] = predicted[kept - 1]
        if drafts is not None:
            k = next_window(np.array([kept for _, kept in verified]), max_draft)


def decode_offsets(backend: Backend, embeddings: np.ndarray, rows: list[RowSpec],
                   notes: list[list[tuple[int, int]]], drafts: Sequence[Draft] | None = None,
                   stats: SpeculativeStats | None = None, max_draft: int = NOTE_DRAFT
                   ) -> tuple[list[list[int]], list[list[OpenNote]]]:
    """Offset stage: own notes first (every row in parallel), then carried notes in rounds.

    Returns each row's offset-stage tokens after `sos task_offset` (`on pitch off` per note) and
    the notes still sounding at each row's end. With `drafts`, parallel as decode_velocities:
    each call verifies up to k queued notes of a row, guessing their offs.
    """
    stats = SpeculativeStats() if stats is None else stats
    batch = len(rows)
    session, _ = start_stage(backend, "offset", embeddings)
    stats.calls += 1
    out: list[list[int]] = [[] for _ in range(batch)]
    carry_out: list[list[OpenNote]] = [[] for _ in range(batch)]
    first_onset = [{p: t for t, p in reversed(n)} for n in notes]  # key -> its first onset tick
    successor = {spec.prev: r for r, spec in enumerate(rows) if spec.prev is not None}
    queues: list[list[Pending]] = []  # per row, the notes still to feed
    for r, (spec, own) in enumerate(zip(rows, notes)):
        limits = next_onset_of_same_key(own)
        queue = [Pending(V.time_token(t), p, t, lim, spec.segment)
                 for (t, p), lim in zip(own, limits)]
        queue += _carried_entries(sorted(spec.carry_in), first_onset[r])
        queues.append(queue)
    own_left = [len(n) for n in notes]
    # A row's own notes that sustain reach its successor sorted by pitch, so they are held
    # back until the row has decided all of its own notes.
    held: list[list[OpenNote]] = [[] for _ in range(batch)]
    for r in range(batch):
        _release_finished_own(r, own_left, held, successor, queues, first_onset)
    guesses: list[dict[int, int]] = [{} for _ in range(batch)]  # queue index -> its guess
    fed_so_far = [0] * batch  # queue entries fed per row: the index of queue[r][0]
    prev = np.full(batch, V.PAD)
    k = np.full(batch, 1 if drafts is None else 2)
    while True:
        fed = np.array([bool(q) for q in queues])
        if not fed.any():
            # Every chain starts at a row with no predecessor in the batch, so an empty round
            # means every row has fed all its notes.
            return out, carry_out
        session.retire(_finished(rows, fed))
        windows = [q[:int(w)] for q, w in zip(queues, k)]
        row_guesses = []
        for r, window in enumerate(windows):
            g, base = guesses[r], fed_so_far[r]
            if drafts is not None:
                for j, h in enumerate(window[:-1]):
                    g.setdefault(base + j, drafts[r].offset(h.on_tick, h.pitch, h.limit_tick))
            row_guesses.append([g.get(base + j, V.PAD) for j in range(len(window))])
        verified = verify_notes(session, prev, [[_known(h) for h in w] for w in windows],
                                row_guesses, stats)
        for r, (predicted, kept) in enumerate(verified):
            for j, off in enumerate(predicted):  # Jacobi: the next guesses
                guesses[r][fed_so_far[r] + j] = off
            for head, off in zip(queues[r][:kept], predicted[:kept]):
                _decided(r, head, off, out, own_left, held, carry_out, successor, queues,
                         first_onset)
                _release_finished_own(r, own_left, held, successor, queues, first_onset)
            del queues[r][:kept]
            fed_so_far[r] += kept
            if kept:
                prev[r] = predicted[kept - 1]
        if drafts is not None:
            k = next_window(np.array([kept for _, kept in verified]), max_draft)


def decode_offsets_separate(backend: Backend, embeddings: np.ndarray, rows: list[RowSpec],
                            notes: list[list[tuple[int, int]]],
                            stats: SpeculativeStats | None = None
                            ) -> tuple[list[list[int]], list[list[OpenNote]]]:
    """The authors' offset-stage layout (DecoderSpec.carried "separate"), greedy: a segment's
    carried notes are decoded in a sequence of their own, `sos task_offset` then `note_sustain
    pitch off` per note, beside the sequence of its own notes, as their inference script does.

    Session rows 0..B-1 are the own-note sequences, B..2B-1 the carried ones (the same
    embeddings). A carried sequence holds the previous segment's own sustaining notes in their
    decoding order (onset, pitch), then the notes that segment carried on (which their script
    drops). It is fed once the previous segment has decided everything, so its order never
    depends on the batch. Returns what decode_offsets returns.
    """
    stats = SpeculativeStats() if stats is None else stats
    batch = len(rows)
    session, _ = start_stage(backend, "offset", np.concatenate([embeddings, embeddings]))
    stats.calls += 1
    first_onset = [{p: t for t, p in reversed(n)} for n in notes]
    successor = {spec.prev: r for r, spec in enumerate(rows) if spec.prev is not None}
    queues: list[list[Pending]] = [
        [Pending(V.time_token(t), p, t, lim, spec.segment)
         for (t, p), lim in zip(own, next_onset_of_same_key(own))]
        for spec, own in zip(rows, notes)]
    queues += [_carried_entries(spec.carry_in, first_onset[r]) for r, spec in enumerate(rows)]
    waiting = [spec.prev is not None for spec in rows]  # its carried notes are not known yet
    decided: list[list[tuple[Pending, int]]] = [[] for _ in range(2 * batch)]
    prev = np.full(2 * batch, V.PAD)
    while True:
        for r in range(batch):  # a finished segment passes its sustaining notes on, once
            if r in successor and not queues[r] and not queues[batch + r] and not waiting[r]:
                nxt = successor.pop(r)
                sustaining = [OpenNote(-head.owner, head.pitch)
                              for head, off in decided[r] + decided[batch + r]
                              if off == V.NOTE_SUSTAIN]
                queues[batch + nxt] += _carried_entries(sustaining, first_onset[nxt])
                waiting[nxt] = False
        fed = np.array([bool(q) for q in queues])
        if not fed.any():
            break
        session.retire(~fed & ~np.array([False] * batch + waiting))
        verified = verify_notes(session, prev, [[_known(q[0])] if q else [] for q in queues],
                                [[V.PAD]] * (2 * batch), stats)
        for r, (predicted, kept) in enumerate(verified):
            if kept:
                decided[r].append((queues[r].pop(0), predicted[0]))
                prev[r] = predicted[0]
    out: list[list[int]] = []
    carry_out: list[list[OpenNote]] = []
    for r in range(batch):
        own, carried = decided[r], decided[batch + r]
        # Written in pianolm's order (own, then carried in carried-block order), which is how
        # the stitcher matches carried notes to the notes left open.
        carried = sorted(carried, key=lambda d: OpenNote(-d[0].owner, d[0].pitch))
        out.append([t for head, off in own + carried
                    for t in (head.on_token, V.pitch_token(head.pitch), off)])
        carry_out.append([OpenNote(-head.owner, head.pitch)  # the order a carried row feeds
                          for head, off in own + decided[batch + r] if off == V.NOTE_SUSTAIN])
    return out, carry_out


def _known(head: Pending) -> Known:
    allowed = offset_mask(np.array([head.on_tick]), np.array([head.limit_tick]))[0]
    return Known(head.on_token, V.pitch_token(head.pitch), allowed)


def _decided(r: int, head: Pending, off: int, out, own_left, held, carry_out, successor,
             queues, first_onset) -> None:
    """Row r's note `head` ends with `off`: its tokens, and where a sustaining note goes."""
    out[r] += [head.on_token, V.pitch_token(head.pitch), off]
    own = head.on_token != V.NOTE_SUSTAIN
    own_left[r] -= own
    if off == V.NOTE_SUSTAIN:
        open_note = OpenNote(-head.owner, head.pitch)
        carry_out[r].append(open_note)
        if own:
            held[r].append(open_note)
        elif r in successor:  # already in carried-block order
            nxt = successor[r]
            queues[nxt] += _carried_entries([open_note], first_onset[nxt])


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


def _release_finished_own(r, own_left, held, successor, queues, first_onset) -> None:
    """Once row r decided all its own notes, pass the sustaining ones to its successor."""
    if own_left[r] == 0 and held[r] and r in successor:
        nxt = successor[r]
        queues[nxt] += _carried_entries(sorted(held[r]), first_onset[nxt])
        held[r].clear()


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


class Drafter(Protocol):
    """Where decode_batch's drafts come from: encodes a batch and drafts each row."""

    def encode(self, backend: Backend, audio: np.ndarray) -> tuple[np.ndarray, list[Draft]]:
        ...


@dataclass
class Speculation:
    """Speculative decoding drafted by the encoder's rolls, from the same encoder run."""

    frames_per_second: float  # the rolls' frame rate (manifest encoder)
    thresholds: RollDecodeConfig  # how the rolls become notes (manifest encoder.rolls)

    def encode(self, backend: Backend, audio: np.ndarray) -> tuple[np.ndarray, list[Draft]]:
        embeddings, rolls = backend.encode_with_rolls(audio)
        if rolls is None:
            raise ValueError("speculative decoding drafts from the encoder's rolls; this "
                             "model's encoder graph has none (manifest encoder.rolls)")
        return embeddings, [RollDraft.from_rolls({key: r[row] for key, r in rolls.items()},
                                                 self.frames_per_second, self.thresholds)
                            for row in range(len(embeddings))]


def speculative_by_default(backend: str) -> bool:
    """The "auto" choice of speculative decoding: on a GPU, where a verify call of many tokens
    costs about one step. On a CPU each extra token of a call costs time (compute, not
    bandwidth, bounds the shipped model's steps there), and the rolls' drafts agree too
    rarely to pay for it (README "Speculative decoding")."""
    return backend in ("cuda", "tensorrt")


def speculation_for(manifest: Manifest | None, wanted: bool | None, backend: str
                    ) -> Speculation | None:
    """decode_batch's `speculation` for a model: `wanted` True / False / None (auto). Raises
    ManifestError when True asks for what the model cannot do."""
    if wanted is False or (wanted is None and not speculative_by_default(backend)):
        return None
    reason = None
    if manifest is None:
        reason = "a model folder's manifest (the rolls' thresholds)"
    elif manifest.encoder.rolls is None:
        reason = "an encoder graph with piano rolls (manifest encoder.rolls)"
    elif not all(manifest.stage(s).every_position for s in manifest.stage_names):
        reason = "step graphs with every position's logits (manifest format_version >= 6)"
    if reason is None:
        thresholds = manifest.encoder.rolls.thresholds
        if any(s.decoder.has_roll_prior for s in manifest.stages):  # drafts in their rule
            thresholds = as_the_prior_reads(thresholds)
        return Speculation(manifest.encoder.frames_per_second, thresholds)
    if wanted:
        raise ManifestError(f"speculative decoding needs {reason}; this model has none: "
                            "use --speculative off, or re-export it with this pianolm")
    return None


def decode_batch(backend: Backend, audio: np.ndarray, rows: list[RowSpec],
                 max_notes: int = DEFAULT_MAX_NOTES, concurrent: bool = True,
                 speculation: Drafter | None = None,
                 stats: dict[str, SpeculativeStats] | None = None,
                 carried: str = "after") -> list[SegmentTokens]:
    """Decode one batch of segments [B, segment_samples] through all stages.

    The velocity and offset stages need only the onset stage's notes, not each other: with
    `concurrent` they run side by side (a second thread; backends release the GIL while a graph
    runs), so the critical path is the onset stage plus the longer of the two. With
    `speculation` (Speculation: the same encoder run's rolls), every stage verifies drafts
    (runtime/speculative.py): the same tokens in fewer decoder calls. `stats` (stage -> counts)
    gains each stage's calls, tokens and draft tokens accepted. `carried`: the offset stage's
    layout (manifest DecoderSpec.carried; "separate" decodes greedily, without drafts).
    """
    if speculation is None:
        embeddings, drafts = backend.encode(audio), None
    else:
        embeddings, drafts = speculation.encode(backend, audio)
    stats = {} if stats is None else stats
    counts = {stage: stats.setdefault(stage, SpeculativeStats()) for stage in backend.stages}
    if backend.stages == ("flat",):
        return decode_flat(backend, embeddings, rows, max_notes, counts["flat"], drafts)
    onsets = decode_onsets(backend, embeddings, max_notes, drafts, counts["onset"])
    notes = [decode_onset(t) for t in onsets]
    for spec, n in zip(rows, notes):
        if len(n) >= max_notes:
            log.warning("segment %d reached the limit of %d notes", spec.segment, max_notes)
    velocity_stage = partial(decode_velocities, backend, embeddings, notes, drafts,
                             counts["velocity"])
    offset_stage = (partial(decode_offsets, backend, embeddings, rows, notes, drafts,
                            counts["offset"]) if carried == "after" else
                    partial(decode_offsets_separate, backend, embeddings, rows, notes,
                            counts["offset"]))
    if concurrent:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(velocity_stage)
            offsets, carry_out = offset_stage()
            velocities = pending.result()
    else:
        velocities = velocity_stage()
        offsets, carry_out = offset_stage()
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
                max_notes: int, stats: SpeculativeStats | None = None,
                drafts: Sequence[Draft] | None = None, max_draft: int = ONSET_DRAFT
                ) -> list[SegmentTokens]:
    """The flattened baseline: one decoder predicts `on pitch off velocity` for every note.
    With `drafts`, speculative as the onset stage: each row's draft is its notes, own then
    carried, in that grammar (speculative.FlatDraft)."""
    stats = SpeculativeStats() if stats is None else stats
    grammar = FlatGrammar(len(rows), max_notes)
    if drafts is None:
        out = _greedy(backend, embeddings, "flat", grammar, stats)
    else:
        flat = [FlatDraft.from_draft(d, [o.pitch for o in sorted(spec.carry_in)])
                for d, spec in zip(drafts, rows)]
        out = _speculate(backend, embeddings, "flat", grammar, stats, max_draft,
                         lambda r, tokens, k: flat[r].continuation(tokens, k))
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
