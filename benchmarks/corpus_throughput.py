"""Throughput of `pianolm corpus` against actors and threads per actor, in one run.

Builds a corpus of the dev set's clips repeated (in sub-folders) to about --minutes of audio,
then for each (actors, threads per actor) runs `pianolm corpus IN -o OUT_k` as a subprocess
(a local Ray started by the command, as a user runs it) and records wall time, audio seconds
per second and real-time factor from results.parquet.

    python benchmarks/corpus_throughput.py --minutes 30 --settings 1x1 2x1 1x2 2x2 \\
        --out benchmarks/results/corpus_throughput_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import soundfile as sf

from pianolm.runtime.provenance import RUNTIME_DISTS, provenance


def build_corpus(root: Path, devset: Path, minutes: float) -> float:
    """Copies of the dev clips, 8 to a sub-folder, until `minutes` of audio; returns seconds."""
    clips = sorted(devset.glob("*.wav"))
    total, k = 0.0, 0
    while total < minutes * 60:
        clip = clips[k % len(clips)]
        folder = root / f"part{k // 8:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(clip, folder / f"{k:04d}_{clip.name}")
        total += sf.info(clip).duration
        k += 1
    return total


def run_setting(corpus: Path, out: Path, actors: int, threads: int, decoder: str) -> dict:
    cmd = [sys.executable, "-m", "pianolm.runtime.cli", "corpus", str(corpus), "-o", str(out),
           "--actors", str(actors), "--threads-per-actor", str(threads), "--decoder", decoder]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    rows = pq.read_table(out / "results.parquet").to_pylist()
    audio = sum(r["audio_s"] for r in rows if r["status"] == "ok")
    return {"actors": actors, "threads_per_actor": threads, "decoder": decoder,
            "files": len(rows), "ok": sum(r["status"] == "ok" for r in rows),
            "audio_s": round(audio, 1), "wall_s": round(wall, 2),
            "audio_s_per_s": round(audio / wall, 3), "rtf": round(wall / audio, 4),
            "summary": proc.stdout.strip().splitlines()[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devset", default=os.environ.get("PIANOLM_DEVSET", "../shared/devset"))
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--settings", nargs="+", default=["1x1", "2x1", "1x2", "2x2"],
                    help="ACTORSxTHREADS per run")
    ap.add_argument("--decoder", default="rolls")
    ap.add_argument("--out", default="benchmarks/results/corpus_throughput_cpu.json")
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "in"
        audio_s = build_corpus(corpus, Path(args.devset), args.minutes)
        for k, setting in enumerate(args.settings):
            actors, threads = (int(v) for v in setting.split("x"))
            run = run_setting(corpus, Path(tmp) / f"out{k}", actors, threads, args.decoder)
            print(json.dumps(run), flush=True)
            runs.append(run)
    base = runs[0]["audio_s_per_s"]
    for run in runs:
        run["vs_first"] = round(run["audio_s_per_s"] / base, 3)
    result = {**provenance((*RUNTIME_DISTS, "ray")), "corpus_audio_s": round(audio_s, 1),
              "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
