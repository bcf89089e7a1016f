"""Peak memory and time of `pianolm transcribe` on long files (flat memory: README "Transcribe").

Builds WAV files of the requested lengths by repeating the dev set's clips (16 kHz, 16-bit),
runs `pianolm transcribe FILE -o OUT --decoder D` as a subprocess per (length, decoder), and
records its peak RSS (getrusage of the child) and wall time, with the shipped default model.

    python benchmarks/memory_long_files.py --minutes 6 60 180 --decoders rolls lm \\
        --out benchmarks/results/memory_long_files.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf

from pianolm.runtime.provenance import provenance

RATE = 16000


def build_wav(path: Path, minutes: float, devset: Path) -> None:
    """A WAV of `minutes` made of the dev clips one after the other, written block by block."""
    clips = [sf.read(p, dtype="int16")[0] for p in sorted(devset.glob("dev_*.wav"))]
    clips = [c if c.ndim == 1 else c[:, 0] for c in clips]
    total = int(minutes * 60 * RATE)
    with sf.SoundFile(path, "w", RATE, 1, subtype="PCM_16") as f:
        written, k = 0, 0
        while written < total:
            block = clips[k % len(clips)][: total - written]
            f.write(block)
            written += len(block)
            k += 1


def run_once(audio: Path, decoder: str, threads: int | None) -> dict:
    out = audio.with_suffix(f".{decoder}.mid")
    cmd = [sys.executable, "-m", "pianolm.runtime.cli", "transcribe", str(audio), "-o", str(out),
           "--decoder", decoder, "--overwrite"]
    if threads:
        cmd += ["--threads", str(threads)]
    # a fresh wrapper per run: RUSAGE_CHILDREN's ru_maxrss is the max over every child so far
    wrapper = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(p.returncode)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    peak_kb = int(proc.stderr.strip().splitlines()[-1])
    notes = next((line for line in proc.stdout.splitlines() if " -> " in line), "")
    return {"decoder": decoder, "wall_s": round(wall, 2), "peak_rss_mb": round(peak_kb / 1024, 1),
            "output": notes}


def summary(args: argparse.Namespace, runs: list[dict]) -> dict:
    """The JSON: machine, versions, commit, every run, and each run's peak RSS against the
    shortest run of its decoder (the issue's target: within 10 %)."""
    for run in runs:
        base = min((r for r in runs if r["decoder"] == run["decoder"]), key=lambda r: r["minutes"])
        run["rss_vs_shortest"] = round(run["peak_rss_mb"] / base["peak_rss_mb"], 3)
        run["rtf_vs_shortest"] = round(run["rtf"] / base["rtf"], 3)
    return {**provenance(), "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, nargs="+", default=[6, 60, 180])
    ap.add_argument("--decoders", nargs="+", default=["rolls", "lm"])
    ap.add_argument("--threads", type=int)
    ap.add_argument("--devset", default=os.environ.get("PIANOLM_DEVSET", "../shared/devset"))
    ap.add_argument("--out", default="benchmarks/results/memory_long_files.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        # shortest first, both decoders at each length: an interrupted run still compares them
        for minutes in sorted(args.minutes):
            audio = Path(tmp) / f"long_{minutes:g}min.wav"
            build_wav(audio, minutes, Path(args.devset))
            for decoder in args.decoders:
                run = {"minutes": minutes, **run_once(audio, decoder, args.threads)}
                run["rtf"] = round(run["wall_s"] / (minutes * 60), 4)
                print(json.dumps(run), flush=True)
                runs.append(run)
                audio.with_suffix(f".{decoder}.mid").unlink(missing_ok=True)
                out.write_text(json.dumps(summary(args, runs), indent=1) + "\n")  # after each
            audio.unlink()


if __name__ == "__main__":
    main()
