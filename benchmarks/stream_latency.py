"""Live transcription's trade-off: note_on latency against onset F1, per window geometry.

For each window / hop / lookahead (`pianolm stream --window --hop --lookahead`), every clip of
a folder (the dev set) is streamed through StreamTranscriber as if it were played live, on
this machine's cores. Playing each clip in real time for every geometry would take hours, so
the clock is simulated exactly: a 0.1 s chunk arrives when the audio clock reaches its end;
its processing starts then, or when the previous chunk's ends if the machine is behind, and
takes the wall time it really takes here. emitted_at is that clock, so latency
(emitted_at - onset) includes the wait for the lookahead and hop, the encoder's time and any
backlog, as in `pianolm stream --pace realtime`.

Per geometry: note_on latency p50 / p95 / max over all notes, onset F1 of the streamed notes
against the offline roll transcription of the same file (`pianolm transcribe --decoder
rolls`) and against the reference, the share of one core's time the stream used (compute
seconds per audio second: above 1 it falls behind) and the backlog at the end of the longest
clip. Then the default geometry keeps up for `--keep-up-s` seconds (default 600) of the clips
played one after another: the backlog and the process's resident memory every 10 s of audio.

    python benchmarks/stream_latency.py --threads 1 \\
        --out benchmarks/results/stream_latency_cpu.json
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pianolm.runtime.evaluation import find_clips, read_reference
from pianolm.runtime.metrics import evaluate
from pianolm.runtime.notes import Note
from pianolm.runtime.provenance import write_report
from pianolm.runtime.stream import (
    DEFAULT_HOP_S,
    DEFAULT_LOOKAHEAD_S,
    DEFAULT_WINDOW_S,
    Event,
    Performance,
    StreamTranscriber,
    file_chunks,
)
from pianolm.runtime.transcriber import Transcriber, default_model_dir, open_backend

CHUNK_S = 0.1  # file_chunks' block: what a sound card hands over at a time
# (window, hop, lookahead) seconds; None: the model's segment
GEOMETRIES = [(None, 2.5, 2.5), (None, 1.0, 1.0), (None, 0.5, 0.5), (4.0, 0.5, 1.0),
              (4.0, 0.5, 0.5), (3.0, 0.25, 0.5), (2.0, 0.2, 0.4), (2.0, 0.1, 0.3),
              (1.5, 0.2, 0.3), (1.5, 0.1, 0.2)]


class AudioClock:
    """The simulated clock: seconds since the first sample, where work starts when its audio
    has arrived or the previous work is done, and takes the wall time it takes here."""

    def __init__(self) -> None:
        self.busy_until = 0.0
        self._start, self._wall = 0.0, time.perf_counter()

    def begin(self, arrived: float) -> None:
        self._start, self._wall = max(arrived, self.busy_until), time.perf_counter()

    def end(self) -> None:
        self.busy_until = self()

    def __call__(self) -> float:
        return self._start + time.perf_counter() - self._wall


class LiveRun:
    """One stream on the simulated clock: each chunk is handed over when the audio clock
    reaches its end, or when the previous chunk's work is done if that is later."""

    def __init__(self, backend, geometry: tuple[float | None, float, float]) -> None:
        window, hop, lookahead = geometry
        self.clock = AudioClock()
        self.st = StreamTranscriber(backend, hop, lookahead, clock=self.clock, window_s=window)
        self.clock.begin(0.0)
        self.st.mark_start()  # emitted_at counts from the first sample's arrival
        self.samples = 0  # 16 kHz samples handed over
        self.compute_s = 0.0  # wall time spent in push / finish

    @property
    def audio_s(self) -> float:
        return self.samples / 16000

    @property
    def backlog_s(self) -> float:
        """How far the work runs behind the audio clock now."""
        return max(0.0, self.clock.busy_until - self.audio_s)

    def push(self, chunk: np.ndarray) -> list[Event]:
        self.samples += len(chunk)
        return self._timed(self.st.push, chunk)

    def finish(self) -> list[Event]:
        return self._timed(self.st.finish)

    def _timed(self, work, *args) -> list[Event]:
        self.clock.begin(self.audio_s)
        t = time.perf_counter()
        events = work(*args)
        self.compute_s += time.perf_counter() - t
        self.clock.end()
        return events


@dataclass
class Streamed:
    notes: list[Note]
    latencies: list[float]  # emitted_at - onset, per note_on
    compute_s: float  # wall time spent in push/finish
    audio_s: float  # seconds of audio streamed
    backlog_s: float  # how far the clock ran behind the audio when the input ended


def stream_clip(backend, path: str, geometry: tuple[float | None, float, float]) -> Streamed:
    run = LiveRun(backend, geometry)
    events = [e for chunk in file_chunks(path, CHUNK_S) for e in run.push(chunk)]
    backlog = run.backlog_s
    events += run.finish()
    performance = Performance()
    for e in events:
        performance.add(e)
    latencies = [e.emitted_at - e.time for e in events if e.kind == "note_on"]
    return Streamed(performance.notes, latencies, run.compute_s, run.audio_s, backlog)


def resident_mb() -> float | None:
    """This process's resident memory now (Linux /proc), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def keep_up(backend, paths: list[str], seconds: float) -> dict:
    """The default geometry on `seconds` of the clips played back to back, on the simulated
    clock: every 10 s of audio, the backlog and resident memory."""
    audio = [np.concatenate(list(file_chunks(p, CHUNK_S))) for p in paths]
    run = LiveRun(backend, (DEFAULT_WINDOW_S, DEFAULT_HOP_S, DEFAULT_LOOKAHEAD_S))
    chunk, notes, trace = round(CHUNK_S * 16000), 0, []
    while run.samples < seconds * 16000:
        for x in audio:
            for i in range(0, len(x), chunk):
                notes += sum(e.kind == "note_on" for e in run.push(x[i:i + chunk]))
                if run.samples % (10 * 16000) < chunk:
                    trace.append({"audio_s": round(run.audio_s, 1),
                                  "backlog_s": round(run.backlog_s, 3),
                                  "resident_mb": resident_mb()})
    return {"window_s": DEFAULT_WINDOW_S, "hop_s": DEFAULT_HOP_S,
            "lookahead_s": DEFAULT_LOOKAHEAD_S, "audio_s": run.audio_s, "notes": notes,
            "core_share": run.compute_s / run.audio_s, "trace": trace}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/devset", help="clips with references")
    ap.add_argument("--model", help="exported model folder (default: the shipped model)")
    ap.add_argument("--threads", type=int, default=1, help="encoder threads (default 1)")
    ap.add_argument("--limit", type=int, help="the first N clips only")
    ap.add_argument("--keep-up-s", type=float, default=600.0,
                    help="seconds of audio for the keep-up run (0: none)")
    ap.add_argument("--out", default="benchmarks/results/stream_latency_cpu.json")
    args = ap.parse_args()
    model = args.model or str(default_model_dir())
    clips = find_clips(args.data)[: args.limit]
    backend = open_backend("cpu", model, args.threads, decoder="rolls")
    offline = Transcriber(model, decoder="rolls", threads=args.threads)
    truth = {c.audio: read_reference(c.reference) for c in clips}
    whole = {c.audio: offline.transcribe(str(c.audio)).notes for c in clips}
    rows = []
    for geometry in GEOMETRIES:
        latencies, f_offline, f_truth, compute, backlog, seconds = [], [], [], 0.0, 0.0, 0.0
        for c in clips:
            s = stream_clip(backend, str(c.audio), geometry)
            latencies += s.latencies
            f_offline.append(evaluate(s.notes, whole[c.audio])["onset_f"])
            f_truth.append(evaluate(s.notes, truth[c.audio])["onset_f"])
            compute, backlog = compute + s.compute_s, max(backlog, s.backlog_s)
            seconds += s.audio_s
        window, hop, lookahead = geometry
        lat = np.asarray(latencies)
        row = {"window_s": window, "hop_s": hop, "lookahead_s": lookahead,
               "notes": int(lat.size), "latency_p50_s": float(np.percentile(lat, 50)),
               "latency_p95_s": float(np.percentile(lat, 95)), "latency_max_s": float(lat.max()),
               "onset_f_vs_offline": float(np.mean(f_offline)),
               "onset_f_vs_reference": float(np.mean(f_truth)),
               "core_share": compute / seconds, "max_backlog_s": backlog}
        rows.append(row)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()},
              flush=True)
    offline_f = float(np.mean([evaluate(whole[c.audio], truth[c.audio])["onset_f"]
                               for c in clips]))
    result = {"data": args.data, "model": model, "clips": len(clips), "threads": args.threads,
              "chunk_s": CHUNK_S, "offline_onset_f_vs_reference": offline_f,
              "audio_s": seconds, "geometries": rows}
    if args.keep_up_s > 0:
        result["keep_up"] = keep_up(backend, [str(c.audio) for c in clips], args.keep_up_s)
        summary = {k: v for k, v in result["keep_up"].items() if k != "trace"}
        print({"keep_up": summary, "last": result["keep_up"]["trace"][-1]}, flush=True)
    write_report(args.out, "stream_latency", result)
    plot(rows, Path(args.out).with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        label = f"W {r['window_s'] or 10:g} / H {r['hop_s']:g} / R {r['lookahead_s']:g}"
        ax.scatter(r["latency_p95_s"], r["onset_f_vs_offline"])
        ax.annotate(label, (r["latency_p95_s"], r["onset_f_vs_offline"]), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    ax.axvline(1.0, color="grey", ls=":", lw=1)
    ax.set_xlabel("note_on latency p95 (s), simulated real time")
    ax.set_ylabel("onset F1, streamed vs offline rolls")
    ax.set_title("pianolm stream: latency against agreement (dev set)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
