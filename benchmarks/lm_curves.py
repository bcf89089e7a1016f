"""Validation curves of LM runs side by side: greedy-decoded validation F1 and teacher-forced
validation loss against training steps, one line per run (e.g. the authors' cross-attention
layout against the time-aligned one, trained on the same data).

    python benchmarks/lm_curves.py --run paper=work/runs/onset-paper-o \
        --run time=work/runs/onset-both-o --metric decode_onset_f \
        --out recipes/default_model/record/lm_onset_curves.png

A run may be given as several folders joined by '+' (a continuation started with --init): their
steps are laid end to end. Writes the plot and, beside it, a JSON with the plotted points.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def val_points(folders: list[Path]) -> list[dict[str, float]]:
    """The `val` records of one run's log.jsonl files, steps offset across continuations."""
    points, offset = [], 0
    for folder in folders:
        last = 0
        for line in (folder / "log.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "val":
                points.append({**rec, "step": rec["step"] + offset})
            last = max(last, int(rec.get("step", 0)))
        offset += last
    return points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, metavar="LABEL=DIR[+DIR...]")
    ap.add_argument("--metric", default="decode_onset_f",
                    help="a val record field: decode_onset_f, decode_onset_offset_f, ...")
    ap.add_argument("--title", default="")
    ap.add_argument("--out", required=True, help="PNG to write (a .json beside it)")
    args = ap.parse_args()

    runs = {}
    for spec in args.run:
        label, _, dirs = spec.partition("=")
        runs[label] = val_points([Path(d) for d in dirs.split("+")])
    fig, (ax_f, ax_l) = plt.subplots(1, 2, figsize=(10, 4))
    for label, points in runs.items():
        steps = [p["step"] for p in points]
        ax_f.plot(steps, [p.get(args.metric, float("nan")) for p in points], "o-", label=label)
        ax_l.plot(steps, [p["val_loss"] for p in points], "o-", label=label)
    ax_f.set(xlabel="training step", ylabel=f"validation {args.metric}", ylim=(0, 1))
    ax_l.set(xlabel="training step", ylabel="validation loss (teacher forced)")
    for ax in (ax_f, ax_l):
        ax.grid(alpha=0.3)
        ax.legend()
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    out.with_suffix(".json").write_text(json.dumps(
        {"metric": args.metric, "runs": {k: [{"step": p["step"], args.metric: p.get(args.metric),
                                              "val_loss": p["val_loss"]} for p in v]
                                         for k, v in runs.items()}}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
