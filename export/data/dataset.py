"""A rendered training set on disk, and the `pianolm data render` command.

Layout (the dev set's note format, so one reader serves both):

    <root>/index.json                 {"format": "pianolm-rendered", "version": 1, "items": [...]}
    <root>/<split>/<id>.flac          16 kHz mono, 16-bit
    <root>/<split>/<id>.tsv           notes as played: onset_s offset_s pitch velocity
    <root>/<split>/<id>.pedal.tsv     sustain pedal: down_s up_s
    <root>/<split>/<id>.json          the item's index entry (instrument, source, augmentation)

    render_dataset("data/rendered", n_pieces=200, seconds=20.0, seed=0, workers=2)
    for item in load_index("data/rendered")["items"]:
        audio, notes, pedal = load_item("data/rendered", item)

Splits: "train" (generated pieces + music21 corpus train pieces) and "validation" (generated
pieces from another seed stream + the corpus validation pieces). Held-out corpus pieces are
never rendered. Each item is reproducible from (seed, split, index); re-running into the same
folder skips the items already written (their <id>.json exists), so a stopped run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from pianolm.runtime.midi import read_notes_tsv, write_notes_tsv
from pianolm.runtime.notes import Note

from .augment import CONDITIONS, AugmentConfig, augment
from .common import Pedal, Piece, merge_pedal
from .corpus import corpus_clip, music21_available
from .generate import generate_piece
from .render import INSTRUMENTS, SAMPLE_RATE, available_instruments, render

FORMAT = "pianolm-rendered"
VERSION = 1
SPLITS = ("train", "validation")
_SPLIT_CODE = {"train": 1, "validation": 2}


@dataclass(frozen=True)
class Job:
    split: str
    index: int
    seed: int
    instrument: str
    source: str  # "generated" or "corpus"
    seconds: float
    augment: bool

    @property
    def id(self) -> str:
        return f"{self.split}-{self.index:06d}"


def plan_jobs(n_pieces: int, seconds: float, seed: int, instruments: Sequence[str],
              val_fraction: float = 0.05, corpus_fraction: float = 0.5,
              augment: bool = True) -> list[Job]:
    """The deterministic list of items to render (instruments balanced per split)."""
    n_val = int(round(n_pieces * val_fraction)) if n_pieces > 1 else 0
    counts = {"train": n_pieces - n_val, "validation": n_val}
    jobs: list[Job] = []
    for split, count in counts.items():
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_CODE[split]]))
        order = np.resize(np.arange(len(instruments)), count)
        rng.shuffle(order)
        for i in range(count):
            item_seed = int(rng.integers(2**31))
            source = "corpus" if rng.random() < corpus_fraction else "generated"
            jobs.append(Job(split, i, item_seed, instruments[int(order[i])], source,
                            float(seconds), augment))
    return jobs


def write_pedal_tsv(pedal: Sequence[Pedal], path: str | os.PathLike) -> None:
    text = "down_s\tup_s\n" + "".join(f"{d:.6f}\t{u:.6f}\n" for d, u in pedal)
    Path(path).write_text(text)


def read_pedal_tsv(path: str | os.PathLike) -> list[Pedal]:
    out: list[Pedal] = []
    for line in Path(path).read_text().splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0].startswith("#"):
            continue
        try:
            out.append((float(fields[0]), float(fields[1])))
        except ValueError:  # the header
            continue
    return out


def make_piece(job: Job) -> Piece:
    """The performance for a job (corpus falls back to generated without music21)."""
    if job.source == "corpus" and music21_available():
        try:
            return corpus_clip(job.seconds, job.seed, split=job.split)
        except RuntimeError:
            pass
    return generate_piece(job.seconds, job.seed)


def render_item(job: Job, root: str | os.PathLike,
                augment_config: AugmentConfig | None = None) -> dict:
    """Render one item into root/<split>/; returns its index entry."""
    folder = Path(root) / job.split
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / f"{job.id}.json"
    if meta_path.is_file():
        try:
            return json.loads(meta_path.read_text())
        except ValueError:
            pass
    t0 = time.perf_counter()
    piece = make_piece(job)
    notes = [n for n in piece.notes if n.onset < job.seconds]
    pedal = merge_pedal(piece.pedal)
    audio = render(notes, pedal, job.instrument, seed=job.seed, duration=job.seconds)
    params: dict = {}
    if job.augment:
        out = augment(audio, notes, pedal, job.seed, augment_config)
        audio, notes, pedal, params = out.audio, out.notes, out.pedal, out.params
    else:
        peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
        if peak > 0:
            audio = audio * np.float32(0.7 / peak)
    audio = np.clip(audio, -1.0, 1.0)
    sf.write(folder / f"{job.id}.flac", audio, SAMPLE_RATE, subtype="PCM_16")
    write_notes_tsv(notes, folder / f"{job.id}.tsv")
    write_pedal_tsv(pedal, folder / f"{job.id}.pedal.tsv")
    entry = {
        "id": job.id, "split": job.split,
        "audio": f"{job.split}/{job.id}.flac", "notes": f"{job.split}/{job.id}.tsv",
        "pedal": f"{job.split}/{job.id}.pedal.tsv",
        "seconds": job.seconds, "n_notes": len(notes), "n_pedal": len(pedal),
        "instrument": job.instrument, "source": piece.source, "name": piece.name,
        "seed": job.seed, "augment": params, "piece": piece.meta,
        "render_s": round(time.perf_counter() - t0, 3),
    }
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(entry))
    os.replace(tmp, meta_path)
    return entry


def _render_star(args: tuple) -> dict:
    return render_item(*args)


def default_instruments(avail: dict[str, str | None]) -> list[str]:
    """The instruments a render uses unless told: every available one not held out."""
    return [k for k, v in avail.items() if v is None and not INSTRUMENTS[k].held_out]


def render_dataset(out_dir: str | os.PathLike, n_pieces: int, seconds: float = 20.0,
                   seed: int = 0, instruments: Sequence[str] | None = None,
                   workers: int | None = None, val_fraction: float = 0.05,
                   corpus_fraction: float = 0.5, augment: bool = True,
                   augment_config: AugmentConfig | None = None,
                   progress: bool = False) -> dict:
    """Render `n_pieces` clips of `seconds` each into `out_dir`; returns the index.

    instruments: names from render.INSTRUMENTS (default: every one that renders here but
    those held out for validation; an unavailable one named explicitly is an error).
    workers: processes (default: CPU count; 1 renders in this process).
    """
    avail = available_instruments()
    if instruments is None:
        instruments = default_instruments(avail)
        if not instruments:
            raise RuntimeError("no renderer is available: run scripts/install_renderers.sh")
    else:
        bad = {k: avail[k] if k in avail else "unknown instrument"
               for k in instruments if avail.get(k, "unknown") is not None}
        if bad:
            raise RuntimeError("instruments not available: "
                               + "; ".join(f"{k}: {v}" for k, v in bad.items()))
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(n_pieces, seconds, seed, list(instruments), val_fraction,
                     corpus_fraction, augment)
    workers = max(1, int(workers or os.cpu_count() or 1))
    t0 = time.perf_counter()
    entries: list[dict] = []
    args = [(job, str(root), augment_config) for job in jobs]
    if workers == 1 or len(jobs) <= 1:
        for a in args:
            entries.append(_render_star(a))
            if progress:
                print(f"\r{len(entries)}/{len(jobs)}", end="", file=sys.stderr, flush=True)
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            for entry in pool.map(_render_star, args, chunksize=1):
                entries.append(entry)
                if progress:
                    print(f"\r{len(entries)}/{len(jobs)}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    wall = time.perf_counter() - t0
    entries.sort(key=lambda e: (SPLITS.index(e["split"]), e["id"]))
    index = {
        "format": FORMAT, "version": VERSION, "sample_rate": SAMPLE_RATE,
        "seconds": seconds, "seed": seed, "instruments": list(instruments),
        "augment": asdict(augment_config or AugmentConfig()) if augment else None,
        "counts": {s: sum(e["split"] == s for e in entries) for s in SPLITS},
        "render_wall_s": round(wall, 2), "workers": workers,
        "items": entries,
    }
    text = json.dumps(index, indent=1)
    tmp = root / "index.json.tmp"
    tmp.write_text(text)
    os.replace(tmp, root / "index.json")
    return json.loads(text)  # exactly what load_index reads back (tuples become lists)


def load_index(root: str | os.PathLike) -> dict:
    path = Path(root) / "index.json"
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: not a pianolm rendered dataset index")
    if index.get("version", 0) > VERSION:
        raise ValueError(f"{path}: format version {index['version']} is newer than {VERSION}")
    return index


def load_item(root: str | os.PathLike, entry: dict
              ) -> tuple[np.ndarray, list[Note], list[Pedal]]:
    """(float32 mono 16 kHz audio, notes as played, pedal intervals) of an index entry."""
    from pianolm.runtime.audio import load_audio

    base = Path(root)
    return (load_audio(base / entry["audio"]), read_notes_tsv(base / entry["notes"]),
            read_pedal_tsv(base / entry["pedal"]))


# ------------------------------------------------------------------------------------- CLI


def main_render(argv: Sequence[str] | None = None) -> int:
    """`pianolm data render`: render a training set (see the module doc for the layout)."""
    avail = available_instruments()
    ap = argparse.ArgumentParser(
        prog="pianolm data render",
        description="Render generated and music21-corpus piano performances to 16 kHz "
                    "audio + note labels, with several pianos and augmentation.")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--pieces", type=int, default=100, help="number of clips (all splits)")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each clip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--instruments", nargs="+", default=None, metavar="NAME",
                    help="default: every available one not held out; known: " + ", ".join(
                        f"{k}{' (held out)' if INSTRUMENTS[k].held_out else ''}"
                        f"{'' if v is None else ' (unavailable)'}" for k, v in avail.items()))
    ap.add_argument("--workers", type=int, default=None, help="processes (default: CPUs)")
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--corpus-fraction", type=float, default=0.5,
                    help="share of clips from the music21 corpus (rest: generated)")
    ap.add_argument("--conditions", choices=[*CONDITIONS, "dry"], default="train",
                    help="train: the augmentation chain (export/data/augment.py); recorded: "
                         "every clip in a room through a microphone, nothing else (for "
                         "validation and evaluation sets); dry: the renderer's output")
    ap.add_argument("--no-augment", dest="conditions", action="store_const", const="dry",
                    help="the same as --conditions dry")
    ap.add_argument("--list-instruments", action="store_true",
                    help="print the instruments and whether they render here, then exit")
    args = ap.parse_args(argv)
    if args.list_instruments:
        for k, v in avail.items():
            print(f"{k:15s} {'ok' if v is None else 'unavailable: ' + v}")
        return 0
    if args.pieces < 1 or args.seconds <= 0:
        ap.error("--pieces must be >= 1 and --seconds > 0")
    try:
        index = render_dataset(args.out, args.pieces, args.seconds, args.seed,
                               args.instruments, args.workers, args.val_fraction,
                               args.corpus_fraction, args.conditions != "dry",
                               CONDITIONS.get(args.conditions), progress=True)
    except RuntimeError as e:
        print(f"pianolm data render: {e}", file=sys.stderr)
        return 2
    audio_s = args.seconds * len(index["items"])
    notes = sum(e["n_notes"] for e in index["items"])
    print(f"wrote {len(index['items'])} clips ({index['counts']}), {audio_s / 60:.1f} min of "
          f"audio, {notes} notes to {args.out} in {index['render_wall_s']:.1f} s "
          f"({audio_s / max(index['render_wall_s'], 1e-9):.1f} x realtime, "
          f"{index['workers']} workers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_render())
