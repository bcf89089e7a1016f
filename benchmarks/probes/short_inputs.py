"""How much does a short input (under 10 s, tiled by the runtime: runtime/audio.py `_tiled`)
cost? For each clip, the notes of its first N s transcribed on their own against the whole
clip's notes there, both scored on the reference's notes there (onset F1, mean over clips).

    python benchmarks/probes/short_inputs.py --data ../shared/devset
    python benchmarks/probes/short_inputs.py --data ../shared/devset --model work/models/prev-full

Notes within 0.1 s of the cut are left out of all three (the cut changes them). Figures:
engines/default/MODEL.md, "Pianos never heard" (seventeenth session).
"""

from __future__ import annotations

import argparse

import numpy as np
import soundfile as sf

from pianolm.runtime.evaluation import find_clips, read_reference
from pianolm.runtime.metrics import score_notes
from pianolm.runtime.notes import Note
from pianolm.runtime.transcriber import Transcriber


def before(notes: list[Note], seconds: float) -> list[Note]:
    return [n for n in notes if n.onset < seconds - 0.1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="folder of clips with references")
    ap.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    ap.add_argument("--seconds", type=float, nargs="+", default=[1, 2, 3, 5, 7])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    t = Transcriber(model_dir=args.model, decoder="rolls", threads=args.threads)
    whole_f: dict[float, list[float]] = {s: [] for s in args.seconds}
    cut_f: dict[float, list[float]] = {s: [] for s in args.seconds}
    for clip in find_clips(args.data):
        x, rate = sf.read(clip.audio, dtype="float32")
        ref, whole = read_reference(clip.reference), t.transcribe((x, rate)).notes
        for s in args.seconds:
            cut = t.transcribe((x[: int(s * rate)], rate)).notes
            whole_f[s].append(score_notes(before(whole, s), before(ref, s))["onset_f"])
            cut_f[s].append(score_notes(before(cut, s), before(ref, s))["onset_f"])
    print(f"{'first N s':>10} {'whole':>7} {'cut':>7}")
    for s in args.seconds:
        print(f"{s:>10g} {np.mean(whole_f[s]):7.3f} {np.mean(cut_f[s]):7.3f}")


if __name__ == "__main__":
    main()
