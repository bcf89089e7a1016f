"""Load on `pianolm serve`: throughput and latency against concurrency, in one run.

Starts `pianolm serve` on 127.0.0.1 (a free port) per decoder, then for each concurrency c
sends the same requests (the dev set's clips, cycled) with c in flight at a time from an
asyncio httpx client. Per level: throughput (audio seconds per second), p50/p95/p99 latency,
the mean batch the server formed (from its /metrics), and whether every request was answered
200 with the notes of the one-at-a-time run (c = 1, the baseline of every ratio).

    python benchmarks/serve_load.py --decoders rolls lm --concurrency 1 2 4 8 16 \\
        --out benchmarks/results/serve_load_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from pianolm.runtime.provenance import RUNTIME_DISTS, provenance


def start_server(args: argparse.Namespace, decoder: str) -> tuple[str, subprocess.Popen]:
    cmd = [sys.executable, "-m", "pianolm.runtime.cli", "serve", "--port", "0", "--decoder",
           decoder, "--batch", str(args.batch), "--max-wait-ms", str(args.max_wait_ms),
           "--max-queue", "256", "--log-level", "warning", "--backend", args.backend]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("pianolm serve: http://"):
        raise SystemExit(f"pianolm serve did not start: {line}")
    base = line.split()[2].rsplit("/v1/", 1)[0]
    for _ in range(600):
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return base, proc
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit("pianolm serve never became ready")


def batch_rows(base: str) -> tuple[float, float]:
    """(segments, batches) decoded so far, from the server's /metrics."""
    values = {}
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        for name in ("pianolm_batch_rows_sum", "pianolm_batch_rows_count"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return values["pianolm_batch_rows_sum"], values["pianolm_batch_rows_count"]


async def load(base: str, bodies: list[tuple[str, bytes, float]], concurrency: int
               ) -> tuple[float, list[float], list[tuple[str, int, str]]]:
    """Send every body, `concurrency` at a time: (wall seconds, latencies, (clip, status,
    notes TSV) per request in order)."""
    gate = asyncio.Semaphore(concurrency)
    latencies = [0.0] * len(bodies)
    answers: list[tuple[str, int, str]] = [("", 0, "")] * len(bodies)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one(k: int, name: str, body: bytes) -> None:
            async with gate:
                t0 = time.perf_counter()
                r = await client.post(f"{base}/v1/transcribe", params={"format": "tsv"},
                                      content=body)
                latencies[k] = time.perf_counter() - t0
                answers[k] = (name, r.status_code, r.text)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(k, name, body) for k, (name, body, _) in enumerate(bodies)))
        return time.perf_counter() - t0, latencies, answers


def run_decoder(args: argparse.Namespace, decoder: str, bodies: list[tuple[str, bytes, float]]
                ) -> list[dict]:
    base, proc = start_server(args, decoder)
    audio_s = sum(seconds for *_, seconds in bodies)
    levels, reference = [], None
    try:
        asyncio.run(load(base, bodies[:2], 2))  # warm-up: sessions, arenas
        for c in sorted(args.concurrency):
            rows0, batches0 = batch_rows(base)
            wall, lat, answers = asyncio.run(load(base, bodies, c))
            rows1, batches1 = batch_rows(base)
            notes = {name: text for name, status, text in answers if status == 200}
            reference = reference or notes
            level = {"decoder": decoder, "concurrency": c, "requests": len(bodies),
                     "audio_s": round(audio_s, 2), "wall_s": round(wall, 3),
                     "throughput_audio_s_per_s": round(audio_s / wall, 3),
                     "latency_p50_s": round(float(np.percentile(lat, 50)), 3),
                     "latency_p95_s": round(float(np.percentile(lat, 95)), 3),
                     "latency_p99_s": round(float(np.percentile(lat, 99)), 3),
                     "mean_batch_rows": round((rows1 - rows0) / max(batches1 - batches0, 1), 2),
                     "all_200": all(status == 200 for _, status, _ in answers),
                     "notes_identical_to_serial": notes == reference}
            level["throughput_vs_serial"] = round(
                level["throughput_audio_s_per_s"] / levels[0]["throughput_audio_s_per_s"], 3
            ) if levels else 1.0
            print(json.dumps(level), flush=True)
            levels.append(level)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    return levels


def plot(levels: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for decoder in dict.fromkeys(lv["decoder"] for lv in levels):
        rows = [lv for lv in levels if lv["decoder"] == decoder]
        c = [lv["concurrency"] for lv in rows]
        ax1.plot(c, [lv["throughput_audio_s_per_s"] for lv in rows], "o-", label=decoder)
        ax2.plot(c, [lv["latency_p50_s"] for lv in rows], "o-", label=f"{decoder} p50")
        ax2.plot(c, [lv["latency_p95_s"] for lv in rows], "s--", label=f"{decoder} p95")
    levels_c = sorted({lv["concurrency"] for lv in levels})
    for ax, ylabel in ((ax1, "audio seconds per second"), (ax2, "request latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels_c, [str(c) for c in levels_c])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    ax1.set_title("pianolm serve: throughput")
    ax2.set_title("latency")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devset", default=os.environ.get("PIANOLM_DEVSET", "../shared/devset"))
    ap.add_argument("--requests", type=int, default=24, help="requests per level (clips cycled)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--decoders", nargs="+", default=["rolls", "lm"])
    ap.add_argument("--model", help="model folder (default: the shipped one)")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", default="benchmarks/results/serve_load_cpu.json")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot of --out's JSON")
    args = ap.parse_args()
    if args.plot_only:
        out = Path(args.out)
        plot(json.loads(out.read_text())["levels"], out.with_suffix(".png"))
        return

    import soundfile as sf

    clips = sorted(Path(args.devset).glob("*.wav"))
    if not clips:
        raise SystemExit(f"{args.devset}: no .wav clips")
    bodies = [(p.name, p.read_bytes(), sf.info(p).duration)
              for p in (clips * args.requests)[: args.requests]]
    levels = [lv for decoder in args.decoders for lv in run_decoder(args, decoder, bodies)]
    result = {**provenance((*RUNTIME_DISTS, "fastapi", "uvicorn")), "backend": args.backend,
              "batch": args.batch, "max_wait_ms": args.max_wait_ms,
              "clips": [p.name for p in clips], "levels": levels}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(levels, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
