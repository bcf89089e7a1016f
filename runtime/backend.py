"""The interface between the decode loop and whatever runs the networks.

The same hierarchical loop (`runtime/decode.py`) drives every backend: ONNX Runtime, TensorRT,
and (from `pianolm.export`) PyTorch with a KV cache or without one (the authors' decode).
Arrays cross this interface as numpy; a device backend may keep its own state on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from . import vocab

if TYPE_CHECKING:
    from .manifest import Manifest, StageSpec


class StageSession(Protocol):
    """One stage's decoder over one batch of segments; owns that batch's self-attention cache.

    Optional: `keep(rows)`, int indices [B'] into the current batch: the session drops every
    other row (cache, cross K/V, positions), so finished rows stop costing work; later chunks
    have B' rows, in `rows`' order. Callers test for it (`getattr(session, "keep", None)`);
    a session without it simply keeps feeding finished rows as padding.
    """

    def step(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Feed a chunk and return the logits of its last position.

        tokens: int64 [B, n], the next n tokens of every row.
        mask:   bool [B, n], False where a row feeds padding (it waits or has finished):
                those positions are invisible to every later token of the row, and do not
                advance the row's position counter (RoPE positions count real tokens only).
        returns float32 [B, vocab]: logits after the chunk's last position of each row.
        """
        ...

    def step_all(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """step(), returning the logits after every position of the chunk: float32
        [B, n, vocab] (a speculative verify). Raises ValueError for step graphs that give the
        last position's only (manifest format_version < 6)."""
        ...

    def retract(self, drop: np.ndarray) -> None:
        """drop: int [B]; the last drop[r] positions of row r's latest chunk become padding
        after the fact (rejected draft tokens): invisible to every later token, not counted
        as the row's tokens (RowPositions.retract). Positions every row drops may leave the
        cache altogether (a host cache's `cut`), so they cost later steps nothing."""
        ...


class Backend(Protocol):
    """Runs the encoder and opens decoder sessions for the stages a model has."""

    stages: tuple[str, ...]  # e.g. ("onset", "velocity", "offset") or ("flat",)
    sample_rate: int  # 16000
    segment_samples: int  # 160000

    def encode(self, audio: np.ndarray) -> np.ndarray:
        """float32 waveform [B, segment_samples] -> embeddings [B, T, E]."""
        ...

    def start(self, stage: str, embeddings: np.ndarray) -> StageSession:
        """Compute the stage's cross-attention K/V once and return an empty session."""
        ...


class RollBackend(Backend, Protocol):
    """A Backend that can also hand out the encoder's piano rolls from the same encoder run
    (the ONNX Runtime and TensorRT backends): the roll-decoding baseline costs no second
    encoder pass."""

    def encode_with_rolls(self, audio: np.ndarray, whole: bool = True
                          ) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        """(embeddings [B, T, E], {onset, offset, frame, velocity: [B, T, 88]} or None when
        the model has no roll outputs). whole=False: audio may be a window shorter than a
        segment (live streaming), where the backend can run one."""
        ...


@dataclass
class RowPositions:
    """Where each row of a batch stands: what a step graph needs besides the tokens.

    counts: int64 [B], real (unmasked) tokens fed so far per row.
    key_mask: bool [B, P], every position fed so far (False = padding).
    ticks: int64 [B], each row's latest query tick (time-aligned decoders, vocab.query_ticks).
    """

    counts: np.ndarray
    key_mask: np.ndarray
    ticks: np.ndarray
    chunk: np.ndarray | None = None  # the latest chunk's mask [B, n] (retract)
    chunk_ticks: tuple[np.ndarray, np.ndarray] | None = None  # ticks before it, its ticks

    @classmethod
    def empty(cls, batch: int) -> RowPositions:
        return cls(np.zeros(batch, dtype=np.int64), np.zeros((batch, 0), dtype=bool),
                   np.zeros(batch, dtype=np.int64))

    def advance(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Record a chunk's mask [B, n]; returns its positions [B, n] int64 and the key mask
        [B, P + n] to feed with it.

        A position is the row's real-token count before it: counts + exclusive cumsum of the
        chunk's mask (= counts + arange(n) when the chunk is all real).
        """
        m = mask.astype(np.int64)
        positions = self.counts[:, None] + np.cumsum(m, axis=1) - m
        # O(B * P) copy per step, like the graph's own past ++ chunk concat of the cache; a
        # preallocated [B, max_len] buffer would make this part O(B * n).
        self.chunk = mask.astype(bool, copy=False)  # never written in place (retract)
        self.key_mask = np.concatenate([self.key_mask, self.chunk], axis=1)
        self.counts = self.counts + m.sum(axis=1)
        return positions, self.key_mask

    def advance_ticks(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """A chunk's query ticks [B, n] int64 (the `query_ticks` input of a time-aligned step
        graph); padding never moves a row's tick."""
        ticks = vocab.query_ticks(tokens, mask, self.ticks)
        self.chunk_ticks = (self.ticks, ticks)
        self.ticks = ticks[:, -1].copy()
        return ticks

    def retract(self, drop: np.ndarray, cut: bool = False) -> int:
        """Make the last drop[r] positions of row r's latest chunk padding (StageSession
        .retract): masked out of the key mask, uncounted, and the row's query tick back at
        the last position it keeps. The cache keeps their entries; no later query sees them.

        cut: also forget the chunk's trailing positions that no row holds any more (the caller
        cuts them from its cache); returns how many (0 without `cut`)."""
        drop = np.asarray(drop)
        n = self.chunk.shape[1]
        if (drop.shape != self.counts.shape or not np.issubdtype(drop.dtype, np.integer)
                or drop.min(initial=0) < 0 or drop.max(initial=0) > n):
            raise ValueError(f"drop must be ints in [0, {n}] per row (the latest chunk's "
                             f"length), got {drop.tolist()}")
        gone = np.arange(n)[None, :] >= (n - drop)[:, None]
        self.counts = self.counts - (gone & self.chunk).sum(axis=1)
        self.chunk = self.chunk & ~gone
        self.key_mask = self.key_mask.copy()  # the array fed with the chunk stays as it was
        self.key_mask[:, -n:] &= self.chunk
        if self.chunk_ticks is not None:
            before, ticks = self.chunk_ticks
            kept = n - drop
            self.ticks = np.where(kept > 0, ticks[np.arange(len(kept)), np.maximum(kept - 1, 0)],
                                  before)
        held = np.flatnonzero(self.chunk.any(axis=0))
        trailing = n - (int(held[-1]) + 1 if len(held) else 0) if cut else 0
        if trailing:
            self.chunk = self.chunk[:, :-trailing]
            self.key_mask = self.key_mask[:, :-trailing]
        return trailing

    def select(self, rows: np.ndarray) -> None:
        """Keep only batch rows `rows` (StageSession.keep)."""
        self.counts = self.counts[rows]
        self.key_mask = self.key_mask[rows]
        self.ticks = self.ticks[rows]
        self.chunk = None if self.chunk is None else self.chunk[rows]
        if self.chunk_ticks is not None:
            self.chunk_ticks = (self.chunk_ticks[0][rows], self.chunk_ticks[1][rows])


class BackendUnavailable(ValueError):
    """This machine lacks what a backend needs (a package, a GPU, an execution provider).

    A ValueError like ManifestError, so callers that report bad inputs in one line report this
    the same way; the message says what to install.
    """


def check_chunk(tokens: np.ndarray, mask: np.ndarray, batch: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Validate a chunk the decode loop feeds; returns int64 tokens and a bool mask."""
    tokens = np.asarray(tokens)
    mask = np.asarray(mask)
    if tokens.ndim != 2 or tokens.shape[0] != batch or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be [B={batch}, n>=1], got shape {tokens.shape}")
    if mask.shape != tokens.shape:
        raise ValueError(f"mask shape {mask.shape} differs from tokens shape {tokens.shape}")
    return tokens.astype(np.int64, copy=False), mask.astype(bool, copy=False)


def check_rows(rows: np.ndarray, batch: int) -> np.ndarray:
    """Validate the rows a session keeps: distinct int indices into [0, batch), at least one."""
    rows = np.asarray(rows)
    if (rows.ndim != 1 or len(rows) == 0 or not np.issubdtype(rows.dtype, np.integer)
            or rows.min() < 0 or rows.max() >= batch or len(np.unique(rows)) != len(rows)):
        raise ValueError(f"rows to keep must be distinct int indices in [0, {batch}), got "
                         f"{rows.tolist()}")
    return rows.astype(np.int64, copy=False)


def check_audio(audio: np.ndarray, segment_samples: int, whole: bool = True) -> np.ndarray:
    """Validate a batch of segments for Backend.encode; returns float32 [B, segment_samples]
    (whole=False: [B, n], a window of 1 <= n <= segment_samples samples)."""
    audio = np.asarray(audio, dtype=np.float32)
    if (audio.ndim != 2 or audio.shape[1] > segment_samples or audio.shape[1] < 1
            or (whole and audio.shape[1] != segment_samples)):
        wanted = segment_samples if whole else f"1..{segment_samples}"
        raise ValueError(f"audio must be [B, {wanted}], got {audio.shape}")
    return audio


def check_embeddings(manifest: Manifest, stage: str, embeddings: np.ndarray
                     ) -> tuple[StageSpec, np.ndarray]:
    """Validate Backend.start's arguments against a model's manifest; returns the stage's spec
    and the embeddings [B, T, E] in its cross-KV graph's input dtype."""
    if stage not in manifest.stage_names:
        raise ValueError(f"stage {stage!r} not in this model's stages "
                         f"{list(manifest.stage_names)}")
    spec = manifest.stage(stage)
    emb = np.asarray(embeddings)
    width = manifest.encoder.embed_dim  # every stage takes the whole; its graph reads its part
    if emb.ndim != 3 or emb.shape[2] != width:
        raise ValueError(f"embeddings must be [B, T, {width}], got {emb.shape}")
    return spec, emb.astype(spec.cross_kv.input("embeddings").dtype, copy=False)
