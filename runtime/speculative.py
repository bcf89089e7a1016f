"""Speculative decoding of the onset stage, drafted by the encoder's rolls: the same tokens as
greedy decoding (runtime/decode.py `decode_onsets`) in fewer decoder calls.

The rolls' notes of a segment are a guess of the `time pitch` tokens the onset stage will emit.
Each call feeds the token greedy decoding chose, then up to k draft tokens that continue the
row's state; one call (StageSession.step_all, manifest format 6) gives the logits after every
position. The row keeps the longest draft prefix on which the grammar-constrained argmax agrees
and the argmax at the first disagreement, which the next call feeds; the rejected positions
become padding (StageSession.retract), so no later token sees them. What a row keeps is what
greedy decoding would have chosen, position by position, under the same grammar.

k adapts to what is accepted: twice the tokens a row last kept, between 1 and `max_draft`.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import vocab as V
from .backend import Backend
from .decode import argmax_allowed, emit, start_stage
from .grammar import OnsetGrammar

DEFAULT_MAX_DRAFT = 16


@dataclass
class SpeculativeStats:
    """What speculation did: decoder calls, tokens emitted, draft tokens fed and accepted."""

    calls: int = 0
    tokens: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_call(self) -> float:
        return self.tokens / self.calls if self.calls else 0.0


def continuation(draft: Sequence[tuple[int, int]], grammar: OnsetGrammar, row: int,
                 k: int) -> list[int]:
    """Up to k draft tokens that continue `row`'s state: the draft's notes (tick, pitch; sorted)
    after the row's latest note, as `time pitch` tokens, then eos. After a time token the next
    draft note must be at that time, or there is no draft."""
    pending, last_tick = int(grammar.pending_tick[row]), int(grammar.last_tick[row])
    last_pitch = int(grammar.last_pitch[row])
    tokens: list[int] = []
    if pending >= 0:
        i = bisect_right(draft, (pending, last_pitch if last_tick == pending else -1))
        if i == len(draft) or draft[i][0] != pending:
            return []
        tokens.append(V.pitch_token(draft[i][1]))
        i += 1
    else:
        i = bisect_right(draft, (last_tick, last_pitch))
    for tick, pitch in draft[i:]:
        if len(tokens) >= k:
            return tokens[:k]
        tokens += [V.time_token(tick), V.pitch_token(pitch)]
    return (tokens + [V.EOS])[:k]


def decode_onsets_speculative(backend: Backend, embeddings: np.ndarray, max_notes: int,
                              drafts: Sequence[Sequence[tuple[int, int]]],
                              max_draft: int = DEFAULT_MAX_DRAFT,
                              stats: SpeculativeStats | None = None) -> list[list[int]]:
    """decode_onsets with each row drafted by drafts[row] (its (tick, pitch) notes, sorted)."""
    batch = len(embeddings)
    stats = stats if stats is not None else SpeculativeStats()
    grammar = OnsetGrammar(batch, max_notes)
    session, logits = start_stage(backend, "onset", embeddings)
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
        guesses = [continuation(drafts[r], grammar, r, int(k[r])) if fed[r] else []
                   for r in range(batch)]
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
            predicted = argmax_allowed(every[:, i - 1], grammar.mask())
            agreeing &= mask[:, i] & (predicted == tokens[:, i])
            for row in np.flatnonzero(agreeing):
                out[row].append(int(tokens[row, i]))
            grammar.update(np.where(agreeing, tokens[:, i], V.PAD))
            kept += agreeing
        stats.accepted += int((kept - fed).sum())
        session.retract(width - kept)
        logits = every[np.arange(batch), np.maximum(kept - 1, 0)]
        k = np.clip(2 * kept, 1, max_draft)
