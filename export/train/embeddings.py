"""Precompute frozen-encoder embeddings once, so LM training never re-runs the encoder.

    embed_dataset("work/data/synth1", "runs/hppnet", "work/emb/hppnet", shifts=(0.0, 5.0))
    pianolm train embed --data work/data/synth1 --encoder-dir runs/hppnet --out work/emb/hppnet

Layout:
    <out>/index.json                {"format": "pianolm-embeddings", "version": 1, encoder facts,
                                     "shifts": [...], "items": [...]}
    <out>/<split>/<id>.tsv          the piece's notes, offsets pedal-extended (seconds)
    <out>/<split>/<id>@<ms>.npy     float16 [S, T, E]: the embeddings of the 10 s segments of
                                    the audio from <ms> milliseconds on (segment k covers
                                    [shift + 10 k, shift + 10 (k + 1)) s, the last zero-padded,
                                    exactly as the runtime segments a file)
    <out>/<split>/<id>@<ms>.rolls.npy  (validation split, shift 0) float16 [S, T, 4 * 88]:
                                    the encoder's onset/offset/frame/velocity rolls, for
                                    roll-decoding baselines without re-running the encoder

One .npy per piece and shift rather than per segment: fewer files, and np.load(mmap_mode="r")
reads one segment's rows. A segment's notes follow from the piece's notes and the shift
(export/train/examples.py re-segments them with runtime.tokens).

Augmentation with frozen embeddings. The encoder's receptive field (biGRU / BiLSTM over the
whole segment) makes a segment's embedding depend on where the segment starts, so a shifted
grid cannot be cut out of the unshifted embeddings without a train/test mismatch (the seams
would sit mid-segment). Instead each requested grid shift is one more encoder pass (`shifts`,
e.g. 0 and 5 s doubles the distinct segments the LM sees, with carried notes in new places).
Cheap in-training augmentations that stay exact are in lm.py (feature dropout).

Resumable: a piece whose files exist is skipped; index.json is rewritten at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pianolm.export.checkpoint import checkpoint_hash
from pianolm.runtime.audio import normalise_peak, segment_audio
from pianolm.runtime.midi import read_notes_tsv, write_notes_tsv
from pianolm.runtime.notes import Note

from .common import atomic_write_text, set_threads
from .encoder import ENCODER_FILE, ROLL_LOSS_KEYS, encoder_info, load_encoder
from .examples import SAMPLE_RATE, dataset_entries, piece_notes

FORMAT = "pianolm-embeddings"
VERSION = 1


@dataclass(frozen=True)
class EmbeddingItem:
    """One piece of an embeddings folder."""

    id: str
    split: str
    notes: list[Note]  # pedal-extended
    files: dict[float, Path]  # shift (s) -> [S, T, E] float16 .npy
    seconds: float

    def segments(self, shift: float) -> np.ndarray:
        return np.load(self.files[shift], mmap_mode="r")


def _shift_tag(shift: float) -> str:
    return f"{int(round(shift * 1000)):06d}"


def embed_dataset(data_root: str | os.PathLike, encoder_dir: str | os.PathLike | None,
                  out_dir: str | os.PathLike, shifts: Sequence[float] = (0.0,),
                  splits: Sequence[str] = ("train", "validation"), batch: int = 4,
                  limit: int | None = None, best: bool = False,
                  encoder: nn.Module | None = None, encoder_name: str | None = None,
                  store_rolls: bool = True, quiet: bool = False) -> dict[str, Any]:
    """Run the frozen encoder over every piece (and grid shift) once; returns the index.

    encoder_dir: an encoder run folder (export/train/encoder.py). Tests may pass `encoder`
    (a module, then `encoder_name` names it) instead.
    """
    from pianolm.export.data.dataset import load_item

    if encoder is None:
        if encoder_dir is None:
            raise ValueError("need encoder_dir (or an encoder module)")
        encoder, meta = load_encoder(encoder_dir, best=best)
        name = meta["encoder"]
        weights = Path(encoder_dir) / ENCODER_FILE
        source = {"encoder_dir": str(encoder_dir), "best": best,
                  "sha256": checkpoint_hash(weights) if weights.is_file() else None}
    else:
        name = encoder_name or type(encoder).__name__.lower()
        source = {"module": type(encoder).__name__}
    encoder.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shifts = sorted({float(s) for s in shifts})
    info = encoder_info(encoder)
    items = []
    t0, audio_s = time.perf_counter(), 0.0
    entries = [e for split in splits for e in dataset_entries(data_root, split)[:limit]]
    for n, entry in enumerate(entries):
        folder = out / entry["split"]
        folder.mkdir(parents=True, exist_ok=True)
        notes_path = folder / f"{entry['id']}.tsv"
        files = {s: folder / f"{entry['id']}@{_shift_tag(s)}.npy" for s in shifts}
        want_rolls = store_rolls and entry["split"] == "validation"
        rolls_path = folder / f"{entry['id']}@{_shift_tag(0.0)}.rolls.npy"
        done = all(f.is_file() for f in files.values()) and notes_path.is_file() and (
            not want_rolls or rolls_path.is_file())
        audio = None
        if not done:
            audio, _, _ = load_item(data_root, entry)
            audio = normalise_peak(audio, encoder.input_peak)  # as the runtime scales a file
            audio_s += len(audio) / SAMPLE_RATE
            for shift, path in files.items():
                start = int(round(shift * SAMPLE_RATE))
                if start >= len(audio):
                    continue  # this shift leaves no audio: no segments
                emb, rolls = _run(encoder, audio[start:], batch,
                                  with_rolls=want_rolls and shift == 0.0)
                _save_npy(path, emb)
                if rolls is not None:
                    _save_npy(rolls_path, rolls)
            write_notes_tsv(piece_notes(data_root, entry), notes_path)
        seconds = float(entry.get("seconds") or 0.0)
        if audio is not None:
            seconds = len(audio) / SAMPLE_RATE
        items.append({
            "id": entry["id"], "split": entry["split"], "seconds": seconds,
            "notes": str(notes_path.relative_to(out)),
            "embeddings": {str(s): str(p.relative_to(out)) for s, p in files.items()
                           if p.is_file()},
            "segments": {str(s): int(np.load(p, mmap_mode="r").shape[0])
                         for s, p in files.items() if p.is_file()},
            **({"rolls": str(rolls_path.relative_to(out))} if rolls_path.is_file() else {}),
        })
        if not quiet and (n + 1) % 10 == 0:
            dt = time.perf_counter() - t0
            print(f"{n + 1}/{len(entries)} pieces, {audio_s / max(dt, 1e-9):.2f} x realtime "
                  f"per shift pass", file=sys.stderr, flush=True)
    index = {"format": FORMAT, "version": VERSION, "encoder": name, "source": source,
             "data_root": str(data_root), "dtype": "float16", "shifts": shifts,
             "roll_keys": list(ROLL_LOSS_KEYS), **info, "items": items}
    atomic_write_text(out / "index.json", json.dumps(index, indent=1) + "\n")
    return index


def embed_oracle(data_root: str | os.PathLike, out_dir: str | os.PathLike,
                 shifts: Sequence[float] = (0.0,), splits: Sequence[str] = ("train", "validation"),
                 frames_per_second: float = 50.0, noise: float = 0.05, limit: int | None = None,
                 seed: int = 0) -> dict[str, Any]:
    """Embeddings that are the *target* rolls (onset, offset, frame, velocity; 4 x 88 per frame,
    HPPNet's layout) plus Gaussian noise: a perfect encoder, no encoder pass at all.

    For checking and tuning LM training on the real note statistics before an encoder exists,
    and as an upper bound of what LM decoding can do. Not for a shipped model.
    """
    from .targets import TargetConfig, roll_targets

    out = Path(out_dir)
    cfg = TargetConfig(frames_per_second=float(frames_per_second))
    frames = int(round(10 * frames_per_second)) + 1
    rng = np.random.default_rng(seed)
    shifts = sorted({float(s) for s in shifts})
    items = []
    for split in splits:
        for entry in dataset_entries(data_root, split)[:limit]:
            notes = piece_notes(data_root, entry)
            seconds = float(entry.get("seconds") or max((n.offset for n in notes), default=0))
            embs = {}
            for shift in shifts:
                n_seg = max(1, -(-int(round((seconds - shift) * 100)) // 1000))
                rows = []
                for k in range(n_seg):
                    t = roll_targets(notes, frames, cfg, start=shift + 10.0 * k)
                    x = np.concatenate([t.onset, t.offset, t.frame, t.velocity], axis=1)
                    if noise:
                        x = np.clip(x + rng.normal(0, noise, x.shape), 0, 1)
                    rows.append(x.astype(np.float16))
                embs[shift] = np.stack(rows)
            item = write_item(out, split, entry["id"], notes, embs)
            item["seconds"] = seconds
            items.append(item)
    write_index(out, items, "oracle", 4 * 88, frames, float(frames_per_second), shifts)
    return load_embeddings_index(out)


@torch.inference_mode()
def _run(encoder: nn.Module, audio: np.ndarray, batch: int, with_rolls: bool
         ) -> tuple[np.ndarray, np.ndarray | None]:
    segments = segment_audio(audio)
    embs, rolls = [], []
    for i in range(0, len(segments), batch):
        out = encoder(torch.from_numpy(segments[i:i + batch]))
        embs.append(out.embedding.float().numpy().astype(np.float16))
        if with_rolls:
            rolls.append(torch.cat([out.rolls[k] for k in ROLL_LOSS_KEYS], dim=2)
                         .float().numpy().astype(np.float16))
    return np.concatenate(embs), (np.concatenate(rolls) if with_rolls else None)


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def load_embeddings_index(root: str | os.PathLike) -> dict[str, Any]:
    path = Path(root) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (run `pianolm train embed` first)")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: not a pianolm embeddings index")
    if index.get("version", 0) > VERSION:
        raise ValueError(f"{path}: version {index['version']} is newer than {VERSION}")
    return index


def load_items(root: str | os.PathLike, split: str, index: Mapping[str, Any] | None = None
               ) -> list[EmbeddingItem]:
    root = Path(root)
    index = index or load_embeddings_index(root)
    out = []
    for it in index["items"]:
        if it["split"] != split:
            continue
        files = {float(s): root / p for s, p in it["embeddings"].items()}
        out.append(EmbeddingItem(it["id"], it["split"], read_notes_tsv(root / it["notes"]),
                                 files, float(it["seconds"])))
    return out


def write_item(root: str | os.PathLike, split: str, item_id: str, notes: Sequence[Note],
               embeddings: Mapping[float, np.ndarray]) -> dict[str, Any]:
    """Write one piece's files (used by tests and by callers with their own encoder loop);
    returns its index entry. embeddings: shift -> [S, T, E]."""
    root = Path(root)
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    notes_path = folder / f"{item_id}.tsv"
    write_notes_tsv(notes, notes_path)
    entry: dict[str, Any] = {"id": item_id, "split": split, "notes": f"{split}/{item_id}.tsv",
                             "embeddings": {}, "segments": {}}
    for shift, emb in embeddings.items():
        path = folder / f"{item_id}@{_shift_tag(shift)}.npy"
        _save_npy(path, np.asarray(emb, np.float16))
        entry["embeddings"][str(float(shift))] = str(path.relative_to(root))
        entry["segments"][str(float(shift))] = int(len(emb))
    first = next(iter(embeddings.values()))
    entry["seconds"] = float(len(first) * 10.0)
    return entry


def write_index(root: str | os.PathLike, items: Sequence[Mapping[str, Any]], encoder: str,
                embed_dim: int, frames_per_segment: int, frames_per_second: float,
                shifts: Sequence[float] = (0.0,)) -> None:
    index = {"format": FORMAT, "version": VERSION, "encoder": encoder, "source": {},
             "dtype": "float16", "shifts": [float(s) for s in shifts],
             "roll_keys": list(ROLL_LOSS_KEYS), "frames_per_second": frames_per_second,
             "embed_dim": embed_dim, "frames_per_segment": frames_per_segment,
             "items": list(items)}
    atomic_write_text(Path(root) / "index.json", json.dumps(index, indent=1) + "\n")


def mix_embeddings(out_dir: str | os.PathLike, train: Sequence[tuple[str | os.PathLike, int]],
                   validation: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """One embeddings folder over several: the train pieces of each (source, repeat) `repeat`
    times, the validation pieces of `validation`. Nothing is copied: the sources are linked
    (out/src0, out/src1, ...) and the index points into them.

    Use: LM data that is mostly oracle rolls (`embed --oracle`, cheap, plentiful) with the real
    encoder's embeddings over-sampled in it, validated on the real encoder's alone. A small set
    of real embeddings on its own is memorised in a few hundred steps before the decoder has
    learned to align time tokens with frames; the oracle pieces teach that alignment.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_dirs = [(Path(d).resolve(), repeat) for d, repeat in train]
    val_dirs = [Path(d).resolve() for d in validation]
    sources = list(dict.fromkeys([d for d, _ in train_dirs] + val_dirs))
    indexes = [load_embeddings_index(d) for d in sources]
    layout = ("embed_dim", "frames_per_segment", "frames_per_second")
    for d, idx in zip(sources, indexes):
        if any(idx[k] != indexes[0][k] for k in layout):
            raise ValueError(f"{d}: {[idx[k] for k in layout]} does not match {sources[0]}'s "
                             f"{[indexes[0][k] for k in layout]} ({', '.join(layout)})")
    links = {}
    for i, d in enumerate(sources):
        link = out / f"src{i}"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(d, target_is_directory=True)
        links[d] = link.name

    def entries(d: Path, split: str, tag: str) -> list[dict[str, Any]]:
        idx, prefix = indexes[sources.index(d)], links[d]
        return [{**it, "id": f"{it['id']}@{tag}", "notes": f"{prefix}/{it['notes']}",
                 "embeddings": {k: f"{prefix}/{v}" for k, v in it["embeddings"].items()},
                 **({"rolls": f"{prefix}/{it['rolls']}"} if "rolls" in it else {})}
                for it in idx["items"] if it["split"] == split]

    items = []
    for d, repeat in train_dirs:
        for k in range(repeat):
            items += entries(d, "train", f"{links[d]}.{k}")
    for d in val_dirs:
        items += entries(d, "validation", links[d])
    # the real encoder's weights, so `assemble` can check them (see assemble_system): kept when
    # there is one real source, or all name the same weights (train and validation embedded apart)
    real = [idx.get("source") or {} for idx in indexes if idx.get("encoder") != "oracle"]
    shas = {src.get("sha256") for src in real}
    source = real[0] if len(real) == 1 or (len(shas) == 1 and None not in shas) else {}
    index = {**{k: indexes[0][k] for k in ("format", "version", "dtype", "roll_keys", *layout)},
             "encoder": "+".join(dict.fromkeys(idx.get("encoder", "?") for idx in indexes)),
             "source": source,
             "shifts": sorted({float(s) for idx in indexes for s in idx.get("shifts", [0.0])}),
             "mixed_from": {links[d]: {"dir": str(d), "encoder": idx.get("encoder")}
                            for d, idx in zip(sources, indexes)},
             "items": items}
    atomic_write_text(out / "index.json", json.dumps(index, indent=1) + "\n")
    return index


# ---------------------------------------------------------------------------------------------
# CLI


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="precompute frozen-encoder embeddings for LM training")
    p.add_argument("--data", required=True, help="rendered dataset root")
    p.add_argument("--encoder-dir", help="encoder run folder")
    p.add_argument("--out", required=True, help="embeddings folder")
    p.add_argument("--shifts", type=float, nargs="+", default=[0.0],
                   help="segment-grid shifts in seconds (one encoder pass each), e.g. 0 5")
    p.add_argument("--splits", nargs="+", default=["train", "validation"])
    p.add_argument("--batch", type=int, default=4, help="segments per encoder call")
    p.add_argument("--limit", type=int, default=None, help="at most this many pieces a split")
    p.add_argument("--best", action="store_true", help="use best.safetensors")
    p.add_argument("--no-rolls", action="store_true", help="do not store validation rolls")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--oracle", action="store_true",
                   help="no encoder: embeddings are the target rolls plus noise (LM checks)")
    p.add_argument("--oracle-noise", type=float, default=0.05)
    p.set_defaults(func=_run_cli)

    m = sub.add_parser("mix", help="one embeddings folder over several (e.g. oracle + real)")
    m.add_argument("--out", required=True, help="embeddings folder to write (links, index)")
    m.add_argument("--train", nargs="+", required=True, metavar="DIR[:REPEAT]",
                   help="embeddings folders whose train pieces to use, each REPEAT times")
    m.add_argument("--validation", nargs="+", required=True, metavar="DIR",
                   help="embeddings folders whose validation pieces to use")
    m.set_defaults(func=_run_mix)


def _run_mix(args: argparse.Namespace) -> int:
    train = []
    for spec in args.train:
        folder, _, repeat = spec.partition(":")
        train.append((folder, int(repeat or 1)))
    index = mix_embeddings(args.out, train, args.validation)
    counts = {s: sum(1 for it in index["items"] if it["split"] == s) for s in ("train",
                                                                              "validation")}
    print(f"wrote {args.out}: {counts['train']} train and {counts['validation']} validation "
          f"pieces from {len(index['mixed_from'])} folders")
    return 0


def _run_cli(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    t0 = time.perf_counter()
    if args.oracle:
        index = embed_oracle(args.data, args.out, args.shifts, args.splits,
                             noise=args.oracle_noise, limit=args.limit)
    elif not args.encoder_dir:
        raise SystemExit("pianolm train embed: --encoder-dir is required (or --oracle)")
    else:
        index = embed_dataset(args.data, args.encoder_dir, args.out, args.shifts, args.splits,
                              args.batch, args.limit, args.best,
                              store_rolls=not args.no_rolls)
    n = sum(sum(it["segments"].values()) for it in index["items"])
    print(f"wrote {n} segment embeddings of {len(index['items'])} pieces to {args.out} in "
          f"{time.perf_counter() - t0:.0f} s")
    return 0
