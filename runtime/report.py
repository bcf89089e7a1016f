"""Where the time goes: a timing wrapper around any backend, and the report it fills.

`TimedBackend(backend, timings)` is itself a Backend (runtime/backend.py): it times every
encoder call, every stage's cross-K/V (`start`), its prompt (the first step, "prefill") and each
later step, with the past length the step saw. `Report` turns those records, plus what the
transcriber counted (audio seconds, notes, predicted tokens), into the figures a user reads:
per-stage latency, time to first note, tokens/s, notes/s, real-time factor, peak memory.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TypeVar

import numpy as np

from .backend import Backend, StageSession
from .provenance import cpu_model
from .speculative import SpeculativeStats

T = TypeVar("T")


class StepLog:
    """(rows, past, seconds) of every decode step, 12 bytes each: a list of tuples costs ~100,
    and an hour of LM decoding makes ~250k steps (memory must not grow with the file)."""

    def __init__(self) -> None:
        self._rows, self._past, self._seconds = array("i"), array("i"), array("f")

    def append(self, record: tuple[int, int, float]) -> None:
        rows, past, seconds = record
        self._rows.append(rows)
        self._past.append(past)
        self._seconds.append(seconds)

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[tuple[int, int, float]]:
        return zip(self._rows, self._past, self._seconds)


@dataclass
class StageTimes:
    cross_kv: list[float] = field(default_factory=list)  # seconds per session start
    prefill: list[float] = field(default_factory=list)  # seconds of the `sos task` step
    steps: StepLog = field(default_factory=StepLog)  # (rows, past, seconds) per later step


@dataclass
class Timings:
    """Raw records; appended from the decode loop's threads (list.append is atomic)."""

    encoder: list[tuple[int, float]] = field(default_factory=list)  # (segments, seconds)
    stages: dict[str, StageTimes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def stage(self, name: str) -> StageTimes:
        with self.lock:
            return self.stages.setdefault(name, StageTimes())


@dataclass
class Tally:
    """What a run's decode batches produced, beside its Timings (Transcriber.decode_rows)."""

    files: int = 0
    audio_s: float = 0.0
    notes: int = 0
    tokens: int = 0  # predicted by the decoders (runtime/transcriber.py _predicted_tokens)
    decode_s: float = 0.0  # embeddings to notes, summed over batches
    # per stage: decoder calls, tokens, draft tokens fed and accepted (decode.decode_batch)
    stages: dict[str, SpeculativeStats] = field(default_factory=dict)


class TimedSession:
    def __init__(self, session: StageSession, times: StageTimes) -> None:
        self.session = session
        self.times = times
        self.past = 0  # chunk positions fed so far (the cache length the next step sees)
        self.first = True
        if callable(getattr(session, "keep", None)):
            self.keep = session.keep  # only offered when the wrapped session can drop rows

    def step(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        logits = self.session.step(tokens, mask)
        elapsed = time.perf_counter() - t0
        if self.first:
            self.times.prefill.append(elapsed)
            self.first = False
        else:
            self.times.steps.append((len(tokens), self.past, elapsed))
        self.past += tokens.shape[1]
        return logits

    def step_all(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        logits = self.session.step_all(tokens, mask)
        self.times.steps.append((len(tokens), self.past, time.perf_counter() - t0))
        self.past += tokens.shape[1]
        return logits

    def retract(self, drop: np.ndarray) -> None:
        self.session.retract(drop)


class TimedBackend:
    """A Backend that forwards to `backend` and records how long each call took."""

    def __init__(self, backend: Backend, timings: Timings) -> None:
        self.backend = backend
        self.timings = timings
        self.stages = backend.stages
        self.sample_rate = backend.sample_rate
        self.segment_samples = backend.segment_samples

    def encode(self, audio: np.ndarray) -> np.ndarray:
        return self._timed_encode(self.backend.encode, audio)

    def encode_with_rolls(self, audio: np.ndarray
                          ) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        return self._timed_encode(self.backend.encode_with_rolls, audio)

    def _timed_encode(self, encode: Callable[[np.ndarray], T], audio: np.ndarray) -> T:
        t0 = time.perf_counter()
        out = encode(audio)
        self.timings.encoder.append((len(audio), time.perf_counter() - t0))
        return out

    def start(self, stage: str, embeddings: np.ndarray) -> TimedSession:
        times = self.timings.stage(stage)
        t0 = time.perf_counter()
        session = self.backend.start(stage, embeddings)
        times.cross_kv.append(time.perf_counter() - t0)
        return TimedSession(session, times)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _ms(values: list[float]) -> float | None:
    return round(float(np.median(values)) * 1e3, 3) if values else None


@dataclass
class Report:
    """The figures of one transcription run (any number of files)."""

    backend: str
    precision: str
    batch: int
    threads: int | None
    machine: str
    cores: int
    files: int
    audio_s: float
    wall_s: float
    time_to_first_note_s: float | None
    notes: int
    decode_tokens: int  # tokens the decoders predicted (onset stage + one per note per stage)
    decode_s: float  # wall time from embeddings to notes, summed over batches
    encoder_ms_per_segment: float | None
    stages: dict[str, dict[str, float | int | None]]
    peak_rss_mb: float
    decoder: str = "lm"  # "lm": the stage decoders; "rolls": the encoder's rolls
    concurrent: bool = False  # velocity and offset stages side by side
    speculative: bool = False  # the LM stages verified drafts from the rolls
    decoder_calls: int = 0  # step-graph calls, prompts included, every stage
    drafted: int = 0  # draft tokens fed (speculative)
    accepted: int = 0  # of which the LM agreed with

    @property
    def calls_per_note(self) -> float:
        return self.decoder_calls / self.notes if self.notes else float("nan")

    @property
    def tokens_per_call(self) -> float:
        return self.decode_tokens / self.decoder_calls if self.decoder_calls else float("nan")

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def real_time_factor(self) -> float:
        return self.wall_s / self.audio_s if self.audio_s else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else float("nan")

    @property
    def notes_per_s(self) -> float:
        return self.notes / self.wall_s if self.wall_s else float("nan")

    @classmethod
    def build(cls, timings: Timings, tally: Tally, *, backend: str, precision: str,
              batch: int, threads: int | None, wall_s: float,
              time_to_first_note_s: float | None, decoder: str = "lm",
              concurrent: bool = False, speculative: bool = False) -> Report:
        per_segment = [s / n for n, s in timings.encoder if n]
        counts = tally.stages
        stages = {name: {"cross_kv_ms": _ms(t.cross_kv), "prefill_ms": _ms(t.prefill),
                         "step_ms": _ms([s for _, _, s in t.steps]), "steps": len(t.steps),
                         **({"calls": counts[name].calls, "drafted": counts[name].drafted,
                             "accepted": counts[name].accepted} if name in counts else {})}
                  for name, t in timings.stages.items()}
        total = SpeculativeStats()
        for c in counts.values():
            total.add(c)
        return cls(backend=backend, precision=precision, batch=batch, threads=threads,
                   machine=cpu_model(), cores=os.cpu_count() or 0, files=tally.files,
                   audio_s=round(tally.audio_s, 3), wall_s=round(wall_s, 3),
                   time_to_first_note_s=(None if time_to_first_note_s is None
                                         else round(time_to_first_note_s, 3)),
                   notes=tally.notes, decode_tokens=tally.tokens,
                   decode_s=round(tally.decode_s, 3),
                   encoder_ms_per_segment=_ms(per_segment), stages=stages,
                   peak_rss_mb=round(peak_rss_mb(), 1), decoder=decoder,
                   concurrent=concurrent, speculative=speculative, decoder_calls=total.calls,
                   drafted=total.drafted, accepted=total.accepted)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(real_time_factor=round(self.real_time_factor, 4),
                   tokens_per_s=round(self.tokens_per_s, 1),
                   notes_per_s=round(self.notes_per_s, 1),
                   calls_per_note=round(self.calls_per_note, 3),
                   tokens_per_call=round(self.tokens_per_call, 3),
                   acceptance=round(self.acceptance, 3))
        return out

    def format(self) -> str:
        """A few lines for the terminal."""
        threads = f", {self.threads} threads" if self.threads else ""
        lines = [
            f"{self.files} file(s), {self.audio_s:.1f} s of audio -> {self.notes} notes in "
            f"{self.wall_s:.2f} s (real-time factor {self.real_time_factor:.3f})",
            f"backend {self.backend} {self.precision}, batch {self.batch}{threads}, notes from "
            + (f"the LM stages (velocity and offset "
               f"{'concurrent' if self.concurrent else 'sequential'}); "
               if self.decoder == "lm" else "the encoder rolls; ")
            + f"{self.machine}, {self.cores} cores; peak memory {self.peak_rss_mb:.0f} MB",
            f"encoder {_fmt(self.encoder_ms_per_segment)} ms/segment; time to first note "
            f"{_fmt(self.time_to_first_note_s, 's', 2)}; "
            + (f"decode {self.tokens_per_s:.0f} tokens/s, " if self.decoder == "lm" else "")
            + f"{self.notes_per_s:.1f} notes/s",
        ]
        if self.decoder == "lm" and self.decoder_calls:
            lines.append(f"decoder calls {self.decoder_calls} ({self.calls_per_note:.2f} per "
                         f"note, {self.tokens_per_call:.2f} tokens per call); speculative "
                         + (f"on, {self.acceptance:.0%} of {self.drafted} draft tokens accepted"
                            if self.speculative else "off"))
        for name, s in self.stages.items():
            lines.append(f"  {name:<8} cross-KV {_fmt(s['cross_kv_ms'])} ms, prefill "
                         f"{_fmt(s['prefill_ms'])} ms, step {_fmt(s['step_ms'])} ms "
                         f"(median of {s['steps']})")
        return "\n".join(lines)


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}{' ' + unit if unit else ''}"
