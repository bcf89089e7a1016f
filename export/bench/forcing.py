"""Teacher forcing through the runtime's own decode loop.

`ForcedBackend(backend, targets)` is a Backend (runtime/backend.py) around any other one. Every
step runs in full on the wrapped backend; then its logits are replaced by ones whose argmax is
the row's next target token. So `runtime.decode.decode_batch` drives a random-weight model
through exactly the steps a trained model would take on those notes (same chunks, same grammar
masks, same finished-row dropping, same concurrency), and returns the codec's tokens.

A row's next target follows from what it was fed (ForcedSession); rows that wait or have
finished get logits the grammar overrides anyway. The prompt `sos task` yields the first
prediction in the onset and flat stages; in the velocity and offset stages its logits go unused
(each note's pitch yields that note's prediction). Speculative verify calls and retracted draft
tokens are forced the same way, so a draft's agreement can be set at will (bench/speculative).
"""

from __future__ import annotations

import time

import numpy as np

from pianolm.runtime import vocab as V
from pianolm.runtime.backend import Backend, StageSession


class ForcedSession:
    """A stage session whose logits say `targets[row]`, in order. Which target a position
    predicts follows from what the row has been fed, so verify calls (step_all) and retracted
    draft tokens (retract) are forced as greedy steps are: in the onset and flat stages the
    target after the row's n-th real token past the prompt `sos task` is targets[n] (the
    prompt itself predicts targets[0]); in the velocity and offset stages each note's pitch
    predicts that note's target."""

    def __init__(self, session: StageSession, targets: list[list[int]], owner: ForcedBackend,
                 stage: str) -> None:
        self.session = session
        self.targets = targets
        self.owner = owner
        self.per_token = stage in ("onset", "flat")  # else: a prediction per pitch fed
        self.rows = np.arange(len(targets))  # full-batch row of each row the session holds
        self.fed = np.zeros(len(targets), dtype=np.int64)  # per full-batch row: see above
        self.chunk: tuple[np.ndarray, np.ndarray] | None = None  # latest tokens, mask
        self.prompted = False  # the first call feeds the prompt
        if callable(getattr(session, "keep", None)):
            self.keep = self._keep  # offered only when the wrapped session can drop rows

    def _keep(self, rows: np.ndarray) -> None:
        self.session.keep(rows)
        self.rows = self.rows[np.asarray(rows)]

    def step(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self.session.step(tokens, mask)
        return self._forced(tokens, mask)[:, -1]

    def step_all(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self.session.step_all(tokens, mask)
        return self._forced(tokens, mask)

    def retract(self, drop: np.ndarray) -> None:
        self.session.retract(drop)
        tokens, mask = self.chunk
        n = tokens.shape[1]
        gone = self._counted(tokens, mask) & (np.arange(n)[None, :] >= (n - drop)[:, None])
        self.fed[self.rows] -= gone.sum(axis=1)

    def _counted(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The positions that move a row on to its next target."""
        if self.per_token:
            return mask
        return mask & (tokens >= V.PITCH_BASE) & (tokens < V.VELOCITY_BASE)

    def _forced(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Logits [B, n, vocab]: at each counted position, the row's target there (a per-token
        stage's prompt counts as one)."""
        tokens, mask = np.asarray(tokens), np.asarray(mask, dtype=bool)
        self.chunk = (tokens, mask)
        counted = self._counted(tokens, mask)
        if self.per_token and not self.prompted:  # the prompt: one prediction, after it
            counted = counted & (np.arange(tokens.shape[1]) == tokens.shape[1] - 1)[None, :]
        self.prompted = True
        index = self.fed[self.rows][:, None] + np.cumsum(counted, axis=1) - 1
        self.fed[self.rows] += counted.sum(axis=1)
        forced = np.zeros((*tokens.shape, V.VOCAB_SIZE), dtype=np.float32)
        for i, j in zip(*np.nonzero(counted)):
            row, k = self.rows[i], int(index[i, j])
            if k < len(self.targets[row]):
                forced[i, j, self.targets[row][k]] = 1.0
            if k == 1 and self.per_token:
                self.owner.mark_first_onset()  # time and pitch of a first note are known
        return forced


class ForcedBackend:
    """A Backend whose sessions choose `targets[stage][row]`, in order, whatever the weights."""

    def __init__(self, backend: Backend, targets: dict[str, list[list[int]]]) -> None:
        self.backend = backend
        self.targets = targets
        self.stages = backend.stages
        self.sample_rate = backend.sample_rate
        self.segment_samples = backend.segment_samples
        self.first_onset: float | None = None  # perf_counter() when the first onset was chosen

    def mark_first_onset(self) -> None:
        if self.first_onset is None:
            self.first_onset = time.perf_counter()

    def encode(self, audio: np.ndarray) -> np.ndarray:
        return self.backend.encode(audio)

    def start(self, stage: str, embeddings: np.ndarray) -> ForcedSession:
        return ForcedSession(self.backend.start(stage, embeddings), self.targets[stage], self,
                             stage)
