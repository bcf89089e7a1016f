"""Render speed per instrument: seconds of audio per second of wall time (one process).

    python scripts/bench_render.py [--seconds 30] [--pieces 2] [--instruments ...]

Material: generated pieces (generate_piece) of --seconds each. The sampler's first call
decodes samples (reported separately as 'cold'); later calls reuse them ('warm').
"""

from __future__ import annotations

import argparse
import json
import time

from pianolm.export.data.generate import generate_piece
from pianolm.export.data.render import available_instruments, get_sampler, render


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--pieces", type=int, default=2)
    ap.add_argument("--instruments", nargs="*", default=None)
    ap.add_argument("--backend", default=None, help="fluidsynth or tinysoundfont (SF2 only)")
    args = ap.parse_args(argv)
    avail = available_instruments()
    names = args.instruments or [k for k, v in avail.items() if v is None]
    pieces = [generate_piece(args.seconds, seed) for seed in range(args.pieces)]
    n_notes = sum(len(p.notes) for p in pieces)
    results = {}
    for name in names:
        if avail.get(name):
            results[name] = {"skipped": avail[name]}
            continue
        cold = None
        if name == "salamander":
            get_sampler.cache_clear()
            t = time.perf_counter()
            render(pieces[0].notes, pieces[0].pedal, name, 0, duration=args.seconds)
            cold = time.perf_counter() - t
        t = time.perf_counter()
        for i, p in enumerate(pieces):
            render(p.notes, p.pedal, name, i, duration=args.seconds,
                   backend=args.backend if name not in ("freepats", "salamander") else None)
        wall = time.perf_counter() - t
        audio = args.seconds * len(pieces)
        results[name] = {"audio_s": audio, "wall_s": round(wall, 2),
                         "x_realtime": round(audio / wall, 1), "notes": n_notes}
        if cold is not None:
            results[name]["cold_first_call_s"] = round(cold, 2)
        print(f"{name:15s} {audio / wall:7.1f} x realtime  ({audio:.0f} s audio in {wall:.2f} s"
              + (f"; first call with sample decoding {cold:.2f} s)" if cold else ")"))
    return results


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
