"""Kong et al.'s CRNN (notes + pedal) through pianolm against Kong's own tool, side by side in one
run over the dev set (docs/import.md, "Speed").

Kong's tool is piano_transcription_inference 0.0.6 (PyTorch, batch 1). pianolm runs the folders
`pianolm import kong` writes, fp32 and int8 at batch 1 as Kong's tool runs, and fp32 with a
file's windows batched 4 at a time, on ONNX Runtime, at the same threads. Both get the
same 16 kHz audio (decoding and resampling happen before the clock starts); each round times
every system once over every clip, in turn, and the figures are medians over rounds. Speed does
not depend on the weights' values, so without --checkpoint the weights are random (the Zenodo
layout, export/kong.py random_kong_state); the notes are then compared, not scored:
- fp32: pianolm's notes and pedals against Kong's tool's (same pitch, times within 5 ms,
  velocity within 1), the issue's identity test;
- int8: note F1 (mir_eval, onset / onset+offset / +velocity) with fp32's notes as the reference.

    python benchmarks/kong_speed.py --threads 2 --out benchmarks/results/kong_speed_cpu.json
    python benchmarks/kong_speed.py --replot benchmarks/results/kong_speed_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from pianolm.runtime.audio import load_audio
from pianolm.runtime.metrics import count_matched, score_notes
from pianolm.runtime.notes import Note, Pedal
from pianolm.runtime.provenance import RUNTIME_DISTS, write_report
from pianolm.runtime.transcriber import Transcriber

AUDIO = (".wav", ".flac", ".mp3", ".ogg")
TOLERANCE_S = 0.005
PEER_DISTS = ("torch", "piano-transcription-inference", "torchlibrosa", "librosa")


def kong_tool(checkpoint: Path, threads: int):  # noqa: ANN201 - Kong's class
    import torch
    from piano_transcription_inference import PianoTranscription

    torch.set_num_threads(threads)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per segment
        return PianoTranscription(checkpoint_path=str(checkpoint), device=torch.device("cpu"))


def run_kong(tool, audio: np.ndarray) -> tuple[list[Note], list[Pedal]]:  # noqa: ANN001
    with contextlib.redirect_stdout(io.StringIO()):
        out = tool.transcribe(audio, None)
    notes = [Note(float(e["onset_time"]), float(e["offset_time"]), int(e["midi_note"]),
                  int(e["velocity"])) for e in out["est_note_events"]]
    return notes, [(float(e["onset_time"]), float(e["offset_time"]))
                   for e in out["est_pedal_events"] or []]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devset", type=Path, default=Path("../shared/devset"))
    ap.add_argument("--checkpoint", type=Path, help="Kong's .pth (default: random weights)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/kong_speed_cpu.json"))
    ap.add_argument("--replot", type=Path, help="only redraw the plot of this JSON")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text())["result"], args.replot.with_suffix(".png"))
        return
    from pianolm.export.importing import import_kong
    from pianolm.export.kong import random_kong_state, save_kong_checkpoint

    files = sorted(p for p in args.devset.glob("dev_*") if p.suffix in AUDIO)
    clips = [load_audio(p) for p in files]  # 16 kHz mono float32, as both systems read
    audio_s = sum(len(c) for c in clips) / 16000
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = Path(tmp) / "kong_random.pth"
            save_kong_checkpoint(random_kong_state(seed=0), checkpoint)
        folders = {p: import_kong(checkpoint, Path(tmp) / p, p).folder for p in ("fp32", "int8")}
        systems = {"kong_tool": kong_tool(checkpoint, args.threads),
                   **{f"pianolm_{p}": Transcriber(str(f), threads=args.threads)
                      for p, f in folders.items()},
                   # a file's windows are independent rows: decoded 4 at a time
                   "pianolm_fp32_batch4": Transcriber(str(folders["fp32"]), batch=4,
                                                      threads=args.threads)}

        def run(name: str, audio: np.ndarray) -> tuple[list[Note], list[Pedal]]:
            if name == "kong_tool":
                return run_kong(systems[name], audio)
            result = systems[name].transcribe((audio, 16000))
            return result.notes, result.pedals

        outputs: dict[str, list] = {}
        for name in systems:  # warm-up, and the notes compared below
            outputs[name] = [run(name, c) for c in clips]
        seconds: dict[str, list[float]] = {name: [] for name in systems}
        for _ in range(args.repeats):
            for name in systems:
                t0 = time.perf_counter()
                for c in clips:
                    run(name, c)
                seconds[name].append(time.perf_counter() - t0)

    theirs = [o[0] for o in outputs["kong_tool"]]
    ours = [o[0] for o in outputs["pianolm_fp32"]]
    their_pedals = [p for o in outputs["kong_tool"] for p in o[1]]
    our_pedals = [o[1] for o in outputs["pianolm_fp32"]]
    pedal_hits = sum(any(abs(d - pd) <= TOLERANCE_S and abs(u - pu) <= TOLERANCE_S
                         for pd, pu in mine) for o, mine in zip(outputs["kong_tool"], our_pedals)
                     for d, u in o[1])
    median = {name: float(np.median(s)) for name, s in seconds.items()}
    int8_vs_fp32 = [score_notes(o[0], ref) for o, ref in zip(outputs["pianolm_int8"], ours)]
    result = {
        "clips": len(files), "audio_s": round(audio_s, 2), "threads": args.threads,
        "repeats": args.repeats, "weights": str(args.checkpoint or "random (seed 0)"),
        "seconds": {name: {"median": round(m, 3), "rtf": round(m / audio_s, 4),
                           "all": [round(x, 3) for x in seconds[name]]}
                    for name, m in median.items()},
        "speedup_vs_kong_tool": {name: round(median["kong_tool"] / m, 2)
                                 for name, m in median.items() if name != "kong_tool"},
        "fp32_vs_kong_tool": {
            "notes_kong": sum(map(len, theirs)), "notes_pianolm": sum(map(len, ours)),
            "notes_matched": sum(count_matched(o, t, TOLERANCE_S) for o, t in zip(ours, theirs)),
            "pedals_kong": len(their_pedals), "pedals_pianolm": sum(map(len, our_pedals)),
            "pedals_matched": pedal_hits, "tolerance_s": TOLERANCE_S},
        "int8_vs_fp32_f1": {key: round(float(np.mean([s[key] for s in int8_vs_fp32])), 4)
                            for key in ("onset_f", "onset_offset_f",
                                        "onset_offset_velocity_f")},
    }
    write_report(args.out, "kong_speed", result, (*RUNTIME_DISTS, *PEER_DISTS))
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps(result, indent=1))


def plot(result: dict, path: Path) -> None:
    """Real-time factor of each system (lower is faster), labelled with its speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["seconds"])
    rtf = [result["seconds"][n]["rtf"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3))
    bars = ax.barh(names, rtf, color=["grey"] + ["tab:blue"] * (len(names) - 1))
    for bar, name in zip(bars, names):
        x = result["speedup_vs_kong_tool"].get(name)
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f"  {x}x" if x else "", va="center")
    ax.set_xlabel(f"real-time factor, {result['threads']} threads (dev set, "
                  f"{result['audio_s']:.0f} s)")
    ax.set_title("Kong et al.'s CRNN: his tool vs pianolm")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
