"""Where the LM and the rolls err: counts of each kind of note error, per model and data.

Every clip of each data folder is transcribed by each model with `--decoder lm` and with
`--decoder rolls` (pianolm transcribe's defaults otherwise), and scored against its reference:
the three F1s (means over clips, as `pianolm eval` reports them) and, summed over clips, the
error counts of runtime/metrics.py `note_errors`: missed notes; predictions that are too
early or late, second strikes, octave errors, chord ghosts or isolated; offsets too early or
too late among the onset matches.

    python benchmarks/lm_errors.py --models engines/default work/models/prior-init \\
        --data ../shared/devset work/heldout/iowa-steinway/eval \\
        --out benchmarks/results/lm_errors_cpu.json
"""

from __future__ import annotations

import argparse

import numpy as np

from pianolm.runtime.evaluation import find_clips, read_reference
from pianolm.runtime.metrics import ERROR_KINDS, METRICS, evaluate, note_errors
from pianolm.runtime.provenance import write_report
from pianolm.runtime.transcriber import Transcriber


def score(model: str, decoder: str, data: str, threads: int) -> dict:
    transcriber = Transcriber(model, decoder=decoder, threads=threads)
    f1s, errors, notes, ref_notes = [], dict.fromkeys(ERROR_KINDS, 0), 0, 0
    for clip in find_clips(data):
        ref = read_reference(clip.reference)
        pred = transcriber.transcribe(str(clip.audio)).notes
        f1s.append(evaluate(pred, ref))
        for kind, n in note_errors(pred, ref).items():
            errors[kind] += n
        notes, ref_notes = notes + len(pred), ref_notes + len(ref)
    means = {f"{m}_f": float(np.mean([s[f"{m}_f"] for s in f1s])) for m in METRICS}
    return {"model": model, "decoder": decoder, "data": data, "clips": len(f1s), **means,
            "notes": notes, "reference_notes": ref_notes, "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["engines/default"])
    ap.add_argument("--data", nargs="+", default=["../shared/devset"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/lm_errors_cpu.json")
    args = ap.parse_args()
    rows = []
    for data in args.data:
        for model in args.models:
            for decoder in ("lm", "rolls"):
                row = score(model, decoder, data, args.threads)
                rows.append(row)
                print(row, flush=True)
    write_report(args.out, "lm_errors", {"rows": rows})


if __name__ == "__main__":
    main()
