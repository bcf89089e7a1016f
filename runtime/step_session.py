"""The step-graph session every exported-graph backend shares, and the host KV cache.

`StepSession` implements runtime/backend.py's StageSession once: chunk checks, RoPE positions
and the key-mask history (`RowPositions`, shared with export/torch_backend.py so both follow one
rule), the length limit, and `keep`. A backend subclasses it with its own `_run` and cache:
ONNX Runtime on the host (runtime/ort_backend.py, over `KVCache` here), with IO binding
(runtime/ort_iobinding.py: the cache stays on the device as OrtValues), TensorRT
(runtime/trt_backend.py: device buffers). A cache holds past K/V (grown by each step) and the
segment's cross K/V, one tensor per layer and kind in the graphs' order (graphs.kv_names),
knows its batch size and can `select` rows.

Torch-free: numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .backend import RowPositions, check_chunk, check_rows
from .manifest import DecoderSpec, GraphSpec, StageSpec

NO_EVERY_POSITION = ("this model's step graphs give the logits of a chunk's last position only "
                     "(manifest format_version < 6); re-export it with this pianolm for "
                     "speculative decoding")


class SessionCache(Protocol):
    """What StepSession needs of a cache; `_run` alone reads and writes its contents."""

    @property
    def batch(self) -> int: ...

    def select(self, rows: np.ndarray) -> SessionCache:
        """The cache of batch rows `rows` only (StageSession.keep)."""
        ...

    # Optional: `cut(n) -> SessionCache`, the cache without its last n positions (those every
    # row retracted: StepSession.retract).


def empty_past(graph: GraphSpec, decoder: DecoderSpec, batch: int) -> list[np.ndarray]:
    """The prefill's past: per layer a K and a V of length 0 [B, H, 0, Dh], in the step graph's
    dtype."""
    dtype = graph.input(decoder.past_names[0]).dtype
    return [np.zeros((batch, decoder.n_heads, 0, decoder.head_dim), dtype)
            for _ in decoder.past_names]


@dataclass
class KVCache:
    """One session's attention state, as step-graph inputs: host arrays for the CPU backend."""

    past: list[np.ndarray]  # per layer K, V [B, H, P, Dh] (decoder.past_names order)
    cross: list[np.ndarray]  # decoder.cross_names: per layer K^T, V (+ pointer keys); fixed

    @property
    def batch(self) -> int:
        return int(self.cross[0].shape[0])

    def select(self, rows: np.ndarray) -> KVCache:
        return KVCache([a[rows] for a in self.past], [a[rows] for a in self.cross])

    def cut(self, n: int) -> KVCache:
        """Without the last n positions of the past."""
        return KVCache([np.ascontiguousarray(a[:, :, :-n]) for a in self.past], self.cross)


class StepSession:
    """One stage's decoder over one batch of segments (runtime/backend.py StageSession): the
    bookkeeping every step-graph backend shares (chunk checks, positions, length limit, keep).
    A backend subclasses it with its runner (`session`: an InferenceSession, a TensorRT
    engine), its cache and `_run`.
    """

    def __init__(self, session: Any, spec: StageSpec, cache: SessionCache) -> None:
        self.session = session
        self.decoder = spec.decoder
        self.every_position = spec.every_position  # format 6: logits after every position
        self.cache = cache
        self.batch = cache.batch
        self.rows = RowPositions.empty(self.batch)

    def step(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        logits = self._feed(tokens, mask)
        return logits[:, -1] if logits.ndim == 3 else logits

    def step_all(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The logits after every position of the chunk, [B, n, vocab] (StageSession)."""
        if not self.every_position:
            raise ValueError(NO_EVERY_POSITION)
        return self._feed(tokens, mask)

    def retract(self, drop: np.ndarray) -> None:
        """Forget the last drop[r] positions of row r's latest chunk (StageSession). Those
        every row drops leave a cache that can `cut` (the host's): later steps read less."""
        cut = self.rows.retract(drop, cut=callable(getattr(self.cache, "cut", None)))
        if cut:
            self.cache = self.cache.cut(cut)

    def _feed(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        tokens, mask = check_chunk(tokens, mask, self.batch)
        positions, key_mask = self.rows.advance(mask)
        if self.rows.counts.max(initial=0) > self.decoder.max_seq_len:
            raise ValueError(f"a row passed {self.decoder.max_seq_len} tokens, the longest "
                             f"sequence this model serves (decoder max_seq_len)")
        feeds = {"tokens": tokens, "positions": positions, "key_mask": key_mask}
        if self.decoder.time_aligned:
            feeds["query_ticks"] = self.rows.advance_ticks(tokens, mask)
        logits = self._run(feeds)
        return logits.astype(np.float32, copy=False)

    def keep(self, rows: np.ndarray) -> None:
        """Drop every batch row not in `rows` (the optional StageSession.keep)."""
        rows = check_rows(rows, self.batch)
        self.rows.select(rows)
        self.cache = self.cache.select(rows)
        self.batch = len(rows)

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """feeds: the host inputs (DecoderSpec.step_inputs) -> logits [B, n, vocab] (format 6;
        [B, vocab] before); the cache moves on."""
        raise NotImplementedError
