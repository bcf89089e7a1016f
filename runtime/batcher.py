"""Segments of concurrent requests share decoder batches: the batcher behind `pianolm serve`.

    batcher = SegmentBatcher(Transcriber(batch=8), max_wait_s=0.01, max_jobs=64)
    job = batcher.submit("upload.wav")   # reads the header now; QueueFull when max_jobs wait
    transcription = job.future.result()  # or: await asyncio.wrap_future(job.future)
    batcher.stop()                       # the jobs in flight finish first

One thread owns the backend. It builds each batch in rounds, taking the next segment of every
job in turn (a long request never holds short ones back: their segments interleave), and while
the batch is short waits up to max_wait_s for new jobs before decoding it with
Transcriber.decode_rows, the per-row decode of transcribe_many: a request's notes never depend
on what else was in its batch. A job that fails (bad audio mid-file, a decode error) fails
alone; a cancelled job (its client left) stops costing work at the next batch.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from .audio import AudioError
from .errors import one_line
from .report import TimedBackend, Timings
from .transcriber import InputState, Row, Source, Transcriber, Transcription


class QueueFull(Exception):
    """max_jobs requests are already in the batcher (or it is stopping): try again later."""


class DecodeFailed(Exception):
    """Decoding a request's segments failed inside the model runtime (not its audio)."""


@dataclass(eq=False)  # identity: a job is hashed and found by itself
class Job:
    """One request in the batcher. `future` gets its Transcription or its exception."""

    name: str
    state: InputState
    rows: Iterator[Row]
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None  # when its first segment went into a batch
    cancelled: bool = False
    exhausted: bool = False  # every row handed out

    def cancel(self) -> None:
        """The client is gone: no further segment of this job is decoded."""
        self.cancelled = True

    @property
    def queued_s(self) -> float:
        return (self.started or time.perf_counter()) - self.submitted


@dataclass
class BatchRecord:
    """What one decoded batch cost, for metrics (runtime/server.py)."""

    rows: int
    jobs: int
    seconds: float
    timings: Timings


class SegmentBatcher:
    """Cross-request batching over one Transcriber; its `batch` is the most rows per batch.

    max_wait_s: how long a short batch waits for more requests before it is decoded.
    max_jobs: requests admitted at once (queued or decoding); submit() refuses more.
    on_batch: called in the batcher thread after every batch (metrics).
    """

    def __init__(self, transcriber: Transcriber, max_wait_s: float = 0.01, max_jobs: int = 64,
                 on_batch: Callable[[BatchRecord], None] | None = None) -> None:
        if max_jobs < 1 or max_wait_s < 0:
            raise ValueError("max_jobs must be >= 1 and max_wait_s >= 0")
        self.transcriber = transcriber
        self.max_rows = transcriber.batch
        self.max_wait_s = max_wait_s
        self.max_jobs = max_jobs
        self.on_batch = on_batch
        self._jobs: deque[Job] = deque()  # admitted, not finished; round-robin order
        self._cond = threading.Condition()
        self._stopping = False
        self._arrivals = 0  # jobs ever admitted: a short batch waits for this to change
        self._thread = threading.Thread(target=self._run, name="pianolm-batcher", daemon=True)
        self._thread.start()

    # ---- the request side (any thread)

    def submit(self, source: Source, name: str | None = None, sustain: str | None = None
               ) -> Job:
        """Admit one source. Its header is read here, in the caller's thread: AudioError for
        audio that cannot be opened; QueueFull when max_jobs are in flight or stopping.
        sustain: its note offsets (Transcriber.open); SustainError before anything is read."""
        with self._cond:
            self._admissible()
        state, rows = self.transcriber.open(source, sustain)
        job = Job(name or state.name, state, rows)
        with self._cond:
            self._admissible()
            self._jobs.append(job)
            self._arrivals += 1
            self._cond.notify_all()
        return job

    def _admissible(self) -> None:
        if self._stopping:
            raise QueueFull("the server is shutting down")
        if len(self._jobs) >= self.max_jobs:
            raise QueueFull(f"{len(self._jobs)} requests in flight (--max-queue {self.max_jobs})")

    @property
    def depth(self) -> int:
        """Requests admitted and not finished."""
        return len(self._jobs)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new jobs, finish the ones admitted, end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ---- the batcher thread

    def _run(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            try:
                if batch:
                    self._decode(batch)
            except Exception as e:  # a bug here must not leave requests waiting forever
                reason = f"internal error: {type(e).__name__}: {one_line(e)}"
                for job in dict.fromkeys(job for job, _ in batch):
                    self._finish(job, DecodeFailed(f"{job.name}: {reason}"))

    def _gather(self) -> list[tuple[Job, Row]] | None:
        """The next batch: rounds of one segment per live job until max_rows; if the jobs run
        dry first, wait for new ones until max_wait_s after the first row. None: stopped."""
        with self._cond:
            while not self._jobs and not self._stopping:
                self._cond.wait()
            if not self._jobs:
                return None
        batch: list[tuple[Job, Row]] = []
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_rows:
            if self._round(batch):
                continue  # some job gave a row: go round again
            with self._cond:  # every job is drained for now: wait for a newcomer
                left = deadline - time.perf_counter()
                if left <= 0 or self._stopping:
                    break
                arrived = self._cond.wait_for(
                    lambda seen=self._arrivals: self._arrivals != seen or self._stopping, left)
                if not arrived or self._stopping:
                    break
        return batch

    def _round(self, batch: list[tuple[Job, Row]]) -> bool:
        """One segment of each live job, in turn, while the batch has room; the jobs served
        go to the back of the queue, so the next batch starts with the others."""
        with self._cond:
            jobs = [j for j in self._jobs if not j.exhausted]
        took = False
        for job in jobs:
            if len(batch) >= self.max_rows:
                break
            if job.cancelled:
                self._finish(job, None)
                continue
            try:
                row = next(job.rows, None)
            except AudioError as e:  # bad audio mid-file: this job alone
                self._finish(job, e)
                batch[:] = [(j, r) for j, r in batch if j is not job]
                continue
            if row is None:
                job.exhausted = True
                continue
            job.started = job.started or time.perf_counter()
            batch.append((job, row))
            took = True
            with self._cond:  # served: to the back
                self._jobs.remove(job)
                self._jobs.append(job)
        return took

    def _decode(self, batch: list[tuple[Job, Row]]) -> None:
        t0 = time.perf_counter()
        timings = Timings()
        timed = TimedBackend(self.transcriber.backend, timings)
        jobs = list(dict.fromkeys(job for job, _ in batch))
        try:
            finished = self.transcriber.decode_rows([row for _, row in batch], timed)
        except Exception:
            # Which request broke it? Decode each job's rows alone (a failed decode leaves
            # every input's state as it was); the one that fails again fails alone.
            finished = []
            for job in jobs:
                rows = [row for j, row in batch if j is job]
                try:
                    finished += self.transcriber.decode_rows(rows, timed)
                except Exception as e:
                    self._finish(job, DecodeFailed(f"{job.name}: decoding failed: "
                                                   f"{one_line(e)}"))
        by_state = {id(job.state): job for job in jobs}
        for state, notes in finished:
            job = by_state[id(state)]
            self._finish(job, None, Transcription(job.name, notes, state.duration_s,
                                                    state.pedals))
        for job in jobs:  # never left waiting: every row decoded and still no notes
            if job.exhausted and not job.future.done():
                self._finish(job, DecodeFailed(f"{job.name}: decoding ended without notes"))
        if self.on_batch:
            self.on_batch(BatchRecord(len(batch), len(jobs), time.perf_counter() - t0, timings))

    def _finish(self, job: Job, error: Exception | None,
                result: Transcription | None = None) -> None:
        """Hand a job its result, error or cancellation, and forget it (batcher thread)."""
        close = getattr(job.rows, "close", None)  # a generator: closing releases its file
        if close:
            close()
        with self._cond:
            if job in self._jobs:
                self._jobs.remove(job)
            self._cond.notify_all()
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        elif result is not None and not job.cancelled:
            job.future.set_result(result)
        else:
            job.future.cancel()
