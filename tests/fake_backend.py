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
        return self.step_all(tokens, mask)[:, -1]

    def step_all(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Logits after every position: a function of the row's real tokens up to there."""
        assert tokens.dtype == np.int64 and tokens.shape == mask.shape
        assert len(tokens) == len(self.history)
        self.work[0] += len(tokens)
        self.chunk = np.asarray(mask, dtype=bool)
        out = np.empty((*tokens.shape, V.VOCAB_SIZE), dtype=np.float32)
        for row, (toks, keep) in enumerate(zip(tokens, mask)):
            for i, (t, k) in enumerate(zip(toks, keep)):
                self.history[row] += [int(t)] if k else []
                out[row, i] = self._logits(self.history[row])
        for token, b in self.bias.items():
            out[..., token] += b
        return out

    def retract(self, drop: np.ndarray) -> None:
        """The real tokens among the latest chunk's last drop[r] positions leave row r."""
        n = self.chunk.shape[1]
        for row, d in enumerate(np.asarray(drop)):
            gone = int(self.chunk[row, n - d:].sum())
            if gone:
                del self.history[row][-gone:]

    @staticmethod
    def _logits(history: list) -> np.ndarray:
        seed = hashlib.sha256(repr(history).encode()).digest()[:8]
        return np.random.default_rng(int.from_bytes(seed, "little")).normal(size=V.VOCAB_SIZE)


class DroppableSession(FakeSession):
    """A session that can drop finished rows (the optional StageSession.keep)."""

    def keep(self, rows: np.ndarray) -> None:
        self.history = [self.history[r] for r in rows]
        self.chunk = None  # keep never follows a chunk a retract still refers to


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

    def encode_with_rolls(self, audio: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Rolls [B, 501, 88]: sparse random peaks, from the audio (a draft that mostly
        disagrees with the random logits)."""
        rng = np.random.default_rng(int(abs(audio).sum() * 1e3) % 2**32)
        rolls = {k: (rng.random((len(audio), 501, 88)) ** 40).astype(np.float32)
                 for k in ("onset", "offset", "frame", "velocity")}
        return self.encode(audio), rolls

    def start(self, stage: str, embeddings: np.ndarray) -> FakeSession:
        assert stage in self.stages
        return self.session_cls(stage, embeddings, self.bias, self.work)
