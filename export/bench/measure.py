"""Timed runs of the teacher-forced decode, and the figures made from them.

One run = `decode_batch` on a batch of rows (runtime/decode.py, the loop `pianolm transcribe`
uses), through `TimedBackend` (runtime/report.py: cross-K/V, prefill and every step with its
past length) inside `ForcedBackend` (forcing.py). The forced tokens are checked against the
codec's after every run: every backend does the same work or the run fails.

The encoder is timed on its own (`time_encoder`) and decode runs start from embeddings computed
beforehand (`Precomputed`): the encoder's cost does not depend on the decode, and re-running it
for every decode at batch 16 or 32 would take most of the benchmark's time. Wall time, notes/s,
real-time factor and time to first onset add the encoder's median time for the batch back in.

Figures: medians over the timed runs (after warm-up), with min and max. Per-step latency comes
from the sequential runs only: with the velocity and offset stages side by side, two graphs
share the cores and each step looks slower than it is. Peak memory is the process's peak RSS
since the backend was opened (Linux: /proc/self/clear_refs resets it), torch and the other
backends' leftovers included.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from pianolm.runtime.backend import Backend, StageSession
from pianolm.runtime.decode import DEFAULT_MAX_NOTES, SegmentTokens, decode_batch
from pianolm.runtime.report import TimedBackend, Timings, peak_rss_mb
from pianolm.runtime.speculative import Draft, SpeculativeStats

from .drafts import GivenDrafts
from .forcing import ForcedBackend
from .workload import HIERARCHICAL, Row, row_counts


def limit_threads(threads: int | None) -> contextlib.AbstractContextManager:
    """numpy/scipy BLAS and OpenMP pools (librosa, torch's BLAS) at `threads`, when threadpoolctl
    is there (it comes with the bench extra's scikit-learn); None: as they are."""
    if threads is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads)


@dataclass
class Run:
    decode_s: float  # embeddings in, tokens out: every stage
    first_onset_s: float | None  # decode start to the first (time, pitch) chosen
    timings: Timings
    encoder_s: float = 0.0  # when the run encoded its own audio
    calls: dict[str, SpeculativeStats] = field(default_factory=dict)  # per stage


class Precomputed:
    """A Backend whose encode hands back embeddings computed beforehand."""

    def __init__(self, backend: Backend, embeddings: np.ndarray) -> None:
        self.backend = backend
        self.embeddings = embeddings
        self.stages = backend.stages
        self.sample_rate = backend.sample_rate
        self.segment_samples = backend.segment_samples

    def encode(self, audio: np.ndarray) -> np.ndarray:
        if len(audio) != len(self.embeddings):
            raise ValueError(f"{len(audio)} segments, {len(self.embeddings)} embeddings")
        return self.embeddings

    def start(self, stage: str, embeddings: np.ndarray) -> StageSession:
        return self.backend.start(stage, embeddings)


def stages_of(mode: str) -> tuple[str, ...]:
    return HIERARCHICAL if mode == "hierarchical" else ("flat",)


def expected_tokens(rows: list[Row], mode: str) -> list[dict[str, list[int]]]:
    """What decode_batch must return per row: the codec's sequences after `sos task`."""
    return [{s: r.tokens[s][2:] for s in stages_of(mode)} for r in rows]


def run_once(backend: Backend, rows: list[Row], mode: str, concurrent: bool,
             embeddings: np.ndarray | None = None, drafts: list[Draft] | None = None) -> Run:
    """One teacher-forced decode of `rows` (encoding their audio first unless `embeddings`
    are given), speculative when `drafts` (one per row) are given; raises if the loop chose
    other tokens than the codec's."""
    timings = Timings()
    stages = stages_of(mode)
    inner = backend if embeddings is None else Precomputed(backend, embeddings)
    forced = ForcedBackend(TimedBackend(inner, timings),
                           {s: [r.targets[s] for r in rows] for s in stages})
    audio = np.stack([r.audio for r in rows])
    max_notes = max(DEFAULT_MAX_NOTES, max(r.own_notes + len(r.segment.carried) for r in rows)
                    + 1)
    speculation = None if drafts is None else GivenDrafts(drafts)
    calls: dict[str, SpeculativeStats] = {}
    gc.collect()
    t0 = time.perf_counter()
    out = decode_batch(forced, audio, [r.spec for r in rows], max_notes, concurrent,
                       speculation, calls)
    wall = time.perf_counter() - t0
    check_tokens(out, expected_tokens(rows, mode))
    encoder = sum(s for _, s in timings.encoder) if embeddings is None else 0.0
    first = None if forced.first_onset is None else forced.first_onset - t0 - encoder
    return Run(wall - encoder, first, timings, encoder, calls)


def check_tokens(out: list[SegmentTokens], expected: list[dict[str, list[int]]]) -> None:
    for i, (seg, want) in enumerate(zip(out, expected)):
        for stage, tokens in want.items():
            if seg.tokens[stage] != tokens:
                raise AssertionError(f"row {i}, stage {stage}: the forced decode chose other "
                                     f"tokens than the codec's ({len(seg.tokens[stage])} vs "
                                     f"{len(tokens)} tokens)")


def time_encoder(backend: Backend, audio: np.ndarray, repeats: int, warmup: int
                 ) -> list[float]:
    """Seconds per segment of `backend.encode` on the batch `audio`, one value per timed run."""
    for _ in range(warmup):
        backend.encode(audio)
    out = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        backend.encode(audio)
        out.append((time.perf_counter() - t0) / len(audio))
    return out


# ---------------------------------------------------------------------------------------------
# Statistics


def stats(values: Iterable[float], scale: float = 1.0, digits: int = 3) -> dict | None:
    v = [x * scale for x in values if x is not None]
    if not v:
        return None
    return {"median": round(float(np.median(v)), digits), "min": round(float(min(v)), digits),
            "max": round(float(max(v)), digits), "n": len(v)}


def by_past(steps: list[tuple[int, int, float]], width: int) -> list[dict]:
    """Step latencies bucketed by the past length they saw: [lo, lo + width)."""
    buckets: dict[int, list[float]] = {}
    for _, past, seconds in steps:
        buckets.setdefault(past // width * width, []).append(seconds)
    return [{"past_lo": lo, "past_hi": lo + width, **stats(v, 1e3)}
            for lo, v in sorted(buckets.items())]


def stage_figures(runs: list[Run], stage: str, width: int) -> dict:
    times = [r.timings.stages[stage] for r in runs if stage in r.timings.stages]
    steps = [s for t in times for s in t.steps]
    return {
        "cross_kv_ms": stats((x for t in times for x in t.cross_kv), 1e3),
        "prefill_ms": stats((x for t in times for x in t.prefill), 1e3),
        # per run, the median step; then median / min / max of those over the runs
        "step_ms": stats((float(np.median([s for _, _, s in t.steps])) for t in times
                          if t.steps), 1e3),
        "steps_per_run": len(times[0].steps) if times else 0,
        "step_by_past_ms": by_past(steps, width),
    }


def figures(runs: list[Run], rows: list[Row], mode: str, with_steps: bool, width: int,
            encoder_s_per_segment: float | None = None) -> dict:
    """The figures of one (backend, mode, schedule, batch). Wall time = the encoder's time for
    the batch (`encoder_s_per_segment` x rows, else the run's own) + the decode."""
    counts = row_counts(rows, mode)
    batch = len(rows)
    audio_s = 10.0 * batch

    def encoder(r: Run) -> float:
        return r.encoder_s if encoder_s_per_segment is None else encoder_s_per_segment * batch

    walls = [encoder(r) + r.decode_s for r in runs]
    out = {
        "counts": counts,
        "decode_ms": stats((r.decode_s for r in runs), 1e3),
        "wall_ms": stats(walls, 1e3),
        "encoder_ms_per_segment": stats((encoder(r) / batch for r in runs), 1e3),
        "time_to_first_onset_ms": stats((encoder(r) + r.first_onset_s for r in runs
                                         if r.first_onset_s is not None), 1e3),
        # as `pianolm transcribe` reports it: a batch's notes come out when it is decoded
        "time_to_first_note_ms": stats(walls, 1e3),
        "tokens_per_s": stats((counts["predicted_tokens"] / r.decode_s for r in runs), 1.0, 1),
        "notes_per_s": stats((counts["notes"] / w for w in walls), 1.0, 2),
        "real_time_factor": stats((w / audio_s for w in walls), 1.0, 5),
        "peak_rss_mb": round(peak_rss_mb_now(), 1),
    }
    out["decoder_calls"] = call_figures(runs[0].calls, counts["notes"] + counts["carried"])
    if with_steps:
        out["stages"] = {s: stage_figures(runs, s, width) for s in stages_of(mode)}
    return out


def call_figures(calls: dict[str, SpeculativeStats], notes: int) -> dict:
    """What a run's decoder calls did (the same in every run of an entry: decoding is
    deterministic): per stage calls, tokens, draft tokens fed and accepted; in all, calls per
    note (own and carried) and tokens per call."""
    total = SpeculativeStats()
    for stage in calls.values():
        total.add(stage)
    return {"calls": total.calls, "calls_per_note": round(total.calls / max(notes, 1), 3),
            "tokens_per_call": round(total.tokens_per_call, 3),
            "stages": {s: {"calls": c.calls, "tokens": c.tokens, "drafted": c.drafted,
                           "accepted": c.accepted, "acceptance": round(c.acceptance, 3)}
                       for s, c in calls.items()}}


def measure(backend: Backend, rows: list[Row], mode: str, concurrent: bool, repeats: int,
            warmup: int, width: int, with_steps: bool, embeddings: np.ndarray | None = None,
            encoder_s_per_segment: float | None = None, drafts: list[Draft] | None = None
            ) -> dict:
    for _ in range(warmup):
        run_once(backend, rows, mode, concurrent, embeddings, drafts)
    runs = [run_once(backend, rows, mode, concurrent, embeddings, drafts)
            for _ in range(repeats)]
    return figures(runs, rows, mode, with_steps, width, encoder_s_per_segment)


# ---------------------------------------------------------------------------------------------
# Memory


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb_now() -> float:
    """Peak RSS since the last reset (VmHWM), else since the process started."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()
