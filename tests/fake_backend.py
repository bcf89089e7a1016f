"""A deterministic stand-in for a model: logits are a pseudo-random function of each row's own
history of real (unmasked) tokens. Anything that depends on batch composition, padding or the
order rows are decoded in shows up as different tokens."""

from __future__ import annotations

import hashlib

import numpy as np

from pianolm.runtime import vocab as V


class FakeSession:
    def __init__(self, stage: str, embeddings: np.ndarray, bias: dict[int, float],
                 work: list[int]):
        self.history = [[stage, float(e.sum())] for e in embeddings]
        self.bias = bias
        self.work = work  # shared counter: rows fed to step(), summed over calls

    def step(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        assert tokens.dtype == np.int64 and tokens.shape == mask.shape
        assert len(tokens) == len(self.history)
        self.work[0] += len(tokens)
        out = np.empty((len(tokens), V.VOCAB_SIZE), dtype=np.float32)
        for row, (toks, keep) in enumerate(zip(tokens, mask)):
            self.history[row] += [int(t) for t, k in zip(toks, keep) if k]
            seed = hashlib.sha256(repr(self.history[row]).encode()).digest()[:8]
            out[row] = np.random.default_rng(int.from_bytes(seed, "little")).normal(
                size=V.VOCAB_SIZE)
        for token, b in self.bias.items():
            out[:, token] += b
        return out


class DroppableSession(FakeSession):
    """A session that can drop finished rows (the optional StageSession.keep)."""

    def keep(self, rows: np.ndarray) -> None:
        self.history = [self.history[r] for r in rows]


class FakeBackend:
    sample_rate = 16000
    segment_samples = 160000

    def __init__(self, stages=("onset", "velocity", "offset"), bias=None, droppable=False):
        self.stages = tuple(stages)
        self.bias = bias if bias is not None else {V.EOS: 2.5, V.NOTE_SUSTAIN: 3.3}
        self.session_cls = DroppableSession if droppable else FakeSession
        self.work = [0]

    def encode(self, audio: np.ndarray) -> np.ndarray:
        return audio[:, :: audio.shape[1] // 4][:, :4, None].astype(np.float32)

    def start(self, stage: str, embeddings: np.ndarray) -> FakeSession:
        assert stage in self.stages
        return self.session_cls(stage, embeddings, self.bias, self.work)
