"""Speculative vs plain greedy LM decoding of the shipped default model over the dev set, side
by side in one run (README "Speculative decoding").

Each clip is cut into segments as `pianolm transcribe` cuts them; the encoder runs once per
segment beforehand (its cost does not depend on the decode), then every segment is decoded at
batch 1, carrying its open notes to the next, plainly and speculatively (drafts from the same
encoder run's rolls), alternating for `--repeats` rounds. Both must give the same tokens in
every stage; the JSON holds the decode times (medians), their ratio, decoder calls per note,
tokens per call and each stage's draft acceptance.

    python benchmarks/speculative_devset.py --threads 1 \\
        --out benchmarks/results/speculative_devset_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pianolm.engines import DEFAULT_MODEL_DIR
from pianolm.runtime.audio import load_audio, normalise_peak, segment_audio
from pianolm.runtime.decode import RowSpec, Speculation, decode_batch
from pianolm.runtime.ort_backend import OrtBackend
from pianolm.runtime.provenance import write_report
from pianolm.runtime.speculative import SpeculativeStats

AUDIO = (".wav", ".flac", ".mp3", ".ogg")


class Encoded:
    """A backend whose encoder output (embeddings and rolls) was computed beforehand."""

    def __init__(self, backend: OrtBackend, audio: np.ndarray) -> None:
        self.backend, self.stages = backend, backend.stages
        self.embeddings, self.rolls = backend.encode_with_rolls(audio[None])

    def encode(self, audio: np.ndarray) -> np.ndarray:
        return self.embeddings

    def encode_with_rolls(self, audio: np.ndarray):  # noqa: ANN201
        return self.embeddings, self.rolls

    def start(self, stage: str, embeddings: np.ndarray):  # noqa: ANN201
        return self.backend.start(stage, embeddings)


def decode_all(clips: list[list[Encoded]], speculation: Speculation | None
               ) -> tuple[float, list, dict[str, SpeculativeStats]]:
    """Every clip's segments in order at batch 1; seconds, tokens, per-stage counts."""
    stats: dict[str, SpeculativeStats] = {}
    tokens = []
    t0 = time.perf_counter()
    for segments in clips:
        carry: list = []
        for i, seg in enumerate(segments):
            (out,) = decode_batch(seg, None, [RowSpec(i, None, carry)], concurrent=False,
                                  speculation=speculation, stats=stats)
            carry = out.carry_out
            tokens.append((out.tokens, out.carry_out))
    return time.perf_counter() - t0, tokens, stats


def load_clips(devset: Path, backend: OrtBackend) -> tuple[list[Path], list[list[Encoded]]]:
    """The dev set's audio files, each cut into encoded segments as `pianolm transcribe` cuts."""
    files = sorted(p for p in devset.glob("dev_*") if p.suffix in AUDIO)
    peak = backend.manifest.input_peak
    return files, [[Encoded(backend, s) for s in segment_audio(normalise_peak(load_audio(p),
                                                                               peak))]
                   for p in files]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devset", type=Path, default=Path("../shared/devset"))
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/"
                                                      "speculative_devset_cpu.json"))
    args = ap.parse_args()
    backend = OrtBackend(args.model, threads=args.threads)
    m = backend.manifest
    files, clips = load_clips(args.devset, backend)
    speculation = Speculation(m.encoder.frames_per_second, m.encoder.rolls.thresholds)
    times: dict[str, list[float]] = {"plain": [], "speculative": []}
    counts: dict[str, dict] = {}
    decode_all(clips[:1], speculation)  # warm-up
    for _ in range(args.repeats):
        for mode in times:
            seconds, tokens, stats = decode_all(clips, speculation if mode != "plain" else None)
            times[mode].append(seconds)
            counts[mode] = {"tokens": tokens, "stats": stats}
    identical = counts["plain"]["tokens"] == counts["speculative"]["tokens"]
    notes = sum(len(t["velocity"]) // 3 for t, _ in counts["plain"]["tokens"])
    result = {"clips": len(files), "segments": sum(map(len, clips)), "notes": notes,
              "identical_tokens": identical, "threads": args.threads, "repeats": args.repeats,
              "model": str(args.model)}
    for mode, seconds in times.items():
        stats = counts[mode]["stats"]
        calls = sum(s.calls for s in stats.values())
        result[mode] = {
            "decode_s": {"median": round(float(np.median(seconds)), 3),
                         "min": round(min(seconds), 3), "max": round(max(seconds), 3)},
            "calls_per_note": round(calls / notes, 3),
            "tokens_per_call": round(sum(s.tokens for s in stats.values()) / calls, 3),
            "stages": {name: {"calls": s.calls, "tokens": s.tokens, "drafted": s.drafted,
                              "accepted": s.accepted, "acceptance": round(s.acceptance, 3)}
                       for name, s in stats.items()}}
    result["speedup"] = round(result["plain"]["decode_s"]["median"]
                              / result["speculative"]["decode_s"]["median"], 3)
    write_report(args.out, "speculative_devset", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
