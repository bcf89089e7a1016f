"""Teacher forcing through the runtime's own decode loop.

`ForcedBackend(backend, targets)` is a Backend (runtime/backend.py) around any other one. Every
step runs in full on the wrapped backend; then its logits are replaced by ones whose argmax is
the row's next target token. So `runtime.decode.decode_batch` drives a random-weight model
through exactly the steps a trained model would take on those notes (same chunks, same grammar
masks, same finished-row dropping, same concurrency), and returns the codec's tokens.

A row's next target advances when the step fed the row (the chunk's last position unmasked);
rows that wait or have finished get logits the grammar overrides anyway. The prompt `sos task`
yields the first prediction in the onset and flat stages; in the velocity and offset stages its
logits go unused (each note's chunk yields that note's prediction), so it advances nothing.
"""

from __future__ import annotations

import time

import numpy as np

from pianolm.runtime.backend import Backend, StageSession


class ForcedSession:
    def __init__(self, session: StageSession, targets: list[list[int]], owner: ForcedBackend,
                 stage: str) -> None:
        self.session = session
        self.targets = targets
        self.owner = owner
        self.stage = stage
        self.rows = np.arange(len(targets))  # full-batch row of each row the session holds
        self.next = np.zeros(len(targets), dtype=np.int64)  # per full-batch row
        self.prompt_unused = stage in ("velocity", "offset")
        if callable(getattr(session, "keep", None)):
            self.keep = self._keep  # offered only when the wrapped session can drop rows

    def _keep(self, rows: np.ndarray) -> None:
        self.session.keep(rows)
        self.rows = self.rows[np.asarray(rows)]

    def step(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        logits = self.session.step(tokens, mask)
        forced = np.zeros(logits.shape, dtype=np.float32)
        if self.prompt_unused:
            self.prompt_unused = False
            return forced
        for i in np.flatnonzero(np.asarray(mask)[:, -1]):
            row = self.rows[i]
            k = int(self.next[row])
            if k < len(self.targets[row]):
                forced[i, self.targets[row][k]] = 1.0
            self.next[row] += 1
            if k == 1 and self.stage in ("onset", "flat"):
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
