"""Where the LM path's time goes, per segment: inside ONNX Runtime (each graph) and outside it.

Every dev-set clip is transcribed as `pianolm transcribe --decoder lm` does (a Transcriber
with the CLI's defaults), with each ONNX Runtime session of the backend wrapped so that every
`run` is timed: the encoder, each stage's cross-K/V graph and each stage's step graph, with
their calls. What is left of the wall time is outside ONNX Runtime: reading and resampling
audio, the decode loop (grammar masks, argmax, feeding tokens), the KV-cache bookkeeping and
the per-call input/output handling. The same clips through `--decoder rolls` in the same run
give the ratio the LM path is measured against.

    python benchmarks/lm_profile.py --threads 2 --out benchmarks/results/lm_profile_cpu.json
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

from pianolm.runtime.evaluation import find_clips
from pianolm.runtime.provenance import write_report
from pianolm.runtime.transcriber import Transcriber, default_model_dir


class TimedRuns:
    """An onnxruntime.InferenceSession whose `run` calls are counted and timed."""

    def __init__(self, session, name: str, totals: dict[str, list[float]]) -> None:
        self._session, self._name, self._totals = session, name, totals

    def run(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._session.run(*args, **kwargs)
        finally:
            entry = self._totals[self._name]
            entry[0] += 1
            entry[1] += time.perf_counter() - t0

    def __getattr__(self, name: str):
        return getattr(self._session, name)


def profile(model: str, decoder: str, paths: list[str], threads: int | None) -> dict:
    transcriber = Transcriber(model, decoder=decoder, threads=threads)
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    sessions = transcriber.backend.sessions
    for name in list(sessions):
        sessions[name] = TimedRuns(sessions[name], name, totals)
    t0 = time.perf_counter()
    notes = sum(len(transcriber.transcribe(p).notes) for p in paths)
    wall = time.perf_counter() - t0
    segments = totals["encoder"][0] and int(totals["encoder"][0])
    inside = sum(seconds for _, seconds in totals.values())
    graphs = {name: {"calls": int(calls), "ms": round(seconds * 1e3, 2),
                     "ms_per_call": round(seconds * 1e3 / calls, 4) if calls else None}
              for name, (calls, seconds) in sorted(totals.items())}
    step_calls = sum(g["calls"] for n, g in graphs.items() if n.endswith(".step"))
    return {"decoder": decoder, "wall_s": round(wall, 4), "notes": notes,
            "segments": segments, "inside_ort_s": round(inside, 4),
            "outside_ort_s": round(wall - inside, 4), "step_calls": step_calls,
            "calls_per_note": round(step_calls / notes, 3) if notes else None,
            "outside_ms_per_step_call": (round((wall - inside) * 1e3 / step_calls, 4)
                                         if step_calls else None),
            "graphs": graphs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/devset")
    ap.add_argument("--model", help="exported model folder (default: the shipped model)")
    ap.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each; the fastest kept")
    ap.add_argument("--out", default="benchmarks/results/lm_profile_cpu.json")
    args = ap.parse_args()
    model = args.model or str(default_model_dir())
    paths = [str(c.audio) for c in find_clips(args.data)]
    runs = {}
    for decoder in ("lm", "rolls"):
        tries = [profile(model, decoder, paths, args.threads) for _ in range(args.repeats)]
        runs[decoder] = min(tries, key=lambda r: r["wall_s"])
        print(decoder, runs[decoder], flush=True)
    result = {"data": args.data, "model": model, "threads": args.threads, "clips": len(paths),
              "runs": runs, "lm_over_rolls": round(runs["lm"]["wall_s"]
                                                   / runs["rolls"]["wall_s"], 3)}
    write_report(args.out, "lm_profile", result)
    plot(runs["lm"], Path(args.out).with_suffix(".png"))


def plot(run: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_segment = {name: g["ms"] / run["segments"] for name, g in run["graphs"].items()}
    per_segment["outside ONNX Runtime"] = run["outside_ort_s"] * 1e3 / run["segments"]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    names = list(per_segment)
    ax.barh(names, [per_segment[n] for n in names], color="#4a7")
    ax.set_xlabel("ms per 10 s segment (dev set, --decoder lm)")
    ax.set_title("pianolm transcribe: where the LM path's time goes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
