"""An evaluation folder on a piano no model trained on: render pieces with a held-out
instrument (export/data/render.py `held_out`, default csound-gm) and write what `pianolm eval`
reads: each clip's audio and its reference notes (offsets extended by the pedal, as the dev
set's .tsv files are).

    python benchmarks/make_heldout_set.py --out work/heldout/csound-gm --pieces 12 --seed 7
    pianolm eval --data work/heldout/csound-gm/eval --model engines/default

The pieces come from the project's generator and music21 corpus with a seed no training render
used (1, 2 and 3 are training renders'), so both the piano and the pieces are new to the model.
`--conditions recorded` (the default) puts each clip in a room through a microphone and adds
nothing else (export/data/augment.py RECORDED); `train` applies the training chain (noise,
compression, ...) too; `dry` is the renderer's output.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from pianolm.export.data.augment import CONDITIONS
from pianolm.export.data.dataset import read_pedal_tsv, render_dataset
from pianolm.export.data.render import INSTRUMENTS
from pianolm.runtime.midi import read_notes_tsv, write_notes_tsv
from pianolm.runtime.sustain import extend_by_pedal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder: render/ (the dataset), eval/ (clips)")
    ap.add_argument("--pieces", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--instrument", default="csound-gm",
                    choices=[k for k, s in INSTRUMENTS.items() if s.held_out])
    ap.add_argument("--conditions", choices=[*CONDITIONS, "dry"], default="recorded")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()

    out = Path(args.out)
    render_dataset(out / "render", args.pieces, args.seconds, args.seed, [args.instrument],
                   workers=args.workers, val_fraction=1.0, augment=args.conditions != "dry",
                   augment_config=CONDITIONS.get(args.conditions))
    clips = out / "eval"
    clips.mkdir(parents=True, exist_ok=True)
    for notes_file in sorted((out / "render").glob("*/*.tsv")):
        if notes_file.name.endswith(".pedal.tsv"):
            continue
        stem = notes_file.with_suffix("")
        audio = next(p for p in stem.parent.glob(stem.name + ".*")
                     if p.suffix in (".flac", ".wav"))
        pedal_file = stem.with_name(stem.name + ".pedal.tsv")
        pedal = read_pedal_tsv(pedal_file) if pedal_file.is_file() else []
        notes = extend_by_pedal(read_notes_tsv(notes_file), pedal)
        shutil.copy2(audio, clips / audio.name)
        write_notes_tsv(notes, clips / f"{stem.name}.tsv")
    print(f"wrote {clips}: {len(list(clips.glob('*.tsv')))} clips on {args.instrument} "
          f"({args.conditions})")


if __name__ == "__main__":
    main()
