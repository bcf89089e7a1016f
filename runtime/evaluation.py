"""`pianolm eval`: transcribe a folder of clips and score the notes against references.

    result = evaluate_model("/path/devset", model_dir="engines/mymodel")
    print(result.format())
    write_json(result, "eval.json")

A data folder holds audio files (wav, flac, ogg, ...), each with a reference of the same stem:
`<stem>.tsv` (onset, offset, pitch, velocity as runtime/midi.py reads it; offsets already
pedal-extended), else `<stem>.mid` / `.midi` (read with the sustain pedal extending offsets).
The dev set (`../shared/devset`) is such a folder. That is `sustain="sounding"`, the default;
with "key" (runtime/sustain.py, for a model whose notes end at key releases) a clip's MIDI file
is read as played and the notes are scored unextended. The choice is recorded beside the F1s.

Two transcriptions of every clip are scored (runtime/metrics.py: onset F1 at 50 ms, onset+offset
F1 at ratio 0.2, onset+offset+velocity F1, with P/R): the language model's notes, and the
encoder's own roll-decoded notes (runtime/rolls.py, Kong-style thresholds from the manifest),
the baseline the paper's claim "LM decoding beats roll outputs" is measured against. Both come
from one encoder run per segment: `RollTap` keeps the rolls of the run the decode loop makes.
Models exported before the encoder graph had roll outputs (manifest format 1) are scored on
the LM notes only, and the result says why. A rolls-only model (`pianolm import kong`) is
scored on its roll notes alone, read exactly as `pianolm transcribe` reads them (its own
segmenting and post-processor). Where the model has a pedal and a clip has a MIDI reference
(beside its .tsv, or alone), its pedal intervals are scored too (metrics.score_pedals: pedal
onset and onset+offset F1).

Torch-free: numpy, onnxruntime and mir_eval (`pip install 'pianolm[eval]'`).
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .audio import AudioInfo, probe_audio, tail_start
from .backend import RollBackend, StageSession
from .kong_rolls import kong_notes
from .manifest import MANIFEST_FILE, Manifest, file_sha256, load_manifest
from .metrics import (
    METRICS,
    OFFSET_MIN_TOLERANCE,
    OFFSET_RATIO,
    ONSET_TOLERANCE,
    mean_scores,
    require_mir_eval,
    score_notes,
    score_pedals,
)
from .midi import atomic_write, read_midi, read_midi_with_pedal, read_notes_tsv
from .notes import Note, Pedal
from .report import Report
from .rolls import ROLL_KEYS, decode_rolls, join_segments
from .sustain import KEY, SOUNDING, check_sustain, offsets_of
from .transcriber import (
    Transcriber,
    default_model_dir,
    input_peak_of,
    open_backend,
    segment_align,
)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff")
REFERENCE_SUFFIXES = (".tsv", ".mid", ".midi")  # in order of preference
KINDS = ("lm", "rolls")  # the two transcriptions scored: LM notes, roll-decoded notes
SUSTAIN_WORDS = {SOUNDING: "held by the sustain pedal", KEY: "key releases"}


class EvalError(ValueError):
    """A data folder or option `pianolm eval` cannot work with; the message is one line."""


# ---------------------------------------------------------------------------------------------
# The data folder


@dataclass(frozen=True)
class Clip:
    name: str  # the shared stem
    audio: Path
    reference: Path


def find_clips(folder: str | os.PathLike) -> list[Clip]:
    """Every audio file directly in `folder` with its reference, sorted by name.

    Raises EvalError for a missing folder, a folder without audio files, two audio files of
    one stem, or an audio file without a reference (a clip silently skipped would change the
    mean without anyone noticing)."""
    root = Path(folder)
    if not root.is_dir():
        raise EvalError(f"{root}: no such data folder")
    files = {p.name.lower(): p for p in root.iterdir() if p.is_file()}
    clips: dict[str, Clip] = {}
    for path in sorted(files.values()):
        if path.suffix.lower() not in AUDIO_SUFFIXES or path.name.startswith("."):
            continue
        stem = path.stem
        if stem in clips:
            raise EvalError(f"{clips[stem].audio} and {path} share the stem {stem!r}: keep one "
                            f"audio file per reference")
        reference = next((files[f"{stem}{s}".lower()] for s in REFERENCE_SUFFIXES
                          if f"{stem}{s}".lower() in files), None)
        if reference is None:
            raise EvalError(f"{path}: no reference beside it (expected {stem}.tsv, {stem}.mid "
                            f"or {stem}.midi)")
        clips[stem] = Clip(stem, path, reference)
    if not clips:
        raise EvalError(f"{root}: no audio clips ({' '.join(AUDIO_SUFFIXES)}) with references")
    return list(clips.values())


def read_reference(path: str | os.PathLike, sustain: str = SOUNDING) -> list[Note]:
    """Reference notes with the offsets `sustain` names (runtime/sustain.py). "sounding": a
    .tsv as written (pedal-extended already), a MIDI file with its sustain pedal extending the
    offsets (docs/model.md, "Reference offsets"). "key": the key releases, which only a MIDI
    file holds (the reference itself or the .mid/.midi beside a .tsv), read as played."""
    if sustain == KEY:
        midi = _midi_beside(Path(path))
        if midi is None:
            raise EvalError(f"{path}: holds pedal-extended offsets; --sustain key needs a MIDI "
                            f"reference (.mid/.midi of the same stem) with the key releases")
        return read_midi(midi, extend_pedal=False)
    if Path(path).suffix.lower() == ".tsv":
        return read_notes_tsv(path)
    return read_midi(path, extend_pedal=True)


def read_reference_pedals(path: str | os.PathLike) -> list[Pedal] | None:
    """A reference's sustain-pedal intervals, from its MIDI file: the reference itself, or
    the .mid/.midi of the same stem beside a .tsv (which holds notes only); None where there
    is no MIDI file or it holds no pedal press (the dev set's MIDI files carry their pedal in
    the notes' extended offsets, not as CC64)."""
    midi = _midi_beside(Path(path))
    return (read_midi_with_pedal(midi)[1] or None) if midi is not None else None


def _midi_beside(path: Path) -> Path | None:
    """The reference's MIDI file: itself, else the .mid/.midi of its stem beside it."""
    for midi in (path, path.with_suffix(".mid"), path.with_suffix(".midi")):
        if midi.suffix.lower() in (".mid", ".midi") and midi.is_file():
            return midi
    return None


# ---------------------------------------------------------------------------------------------
# Rolls from the decode loop's own encoder run


class RollTap:
    """A Backend that forwards to `backend` and, when `keep_rolls`, keeps each segment's rolls
    from the encoder run the decode loop makes anyway, in the order segments are encoded (the
    Transcriber's stream order: input by input, segment by segment)."""

    def __init__(self, backend: RollBackend, backend_name: str, keep_rolls: bool) -> None:
        self.backend = backend
        self.backend_name = backend_name  # what the Transcriber's report calls the backend
        self.keep_rolls = keep_rolls
        self.stages = backend.stages
        self.sample_rate = backend.sample_rate
        self.segment_samples = backend.segment_samples
        self.precision: str = getattr(backend, "precision", "fp32")
        self.input_peak = input_peak_of(backend)
        # segments cut as for the backend itself; speculative decoding reads its rolls' spec
        self.manifest = getattr(backend, "manifest", None)
        self.frames_per_second = (self.manifest.encoder.frames_per_second if self.manifest
                                  else None)
        self._queue: deque[dict[str, np.ndarray]] = deque()

    def encode(self, audio: np.ndarray) -> np.ndarray:
        if not self.keep_rolls:
            return self.backend.encode(audio)
        return self.encode_with_rolls(audio)[0]

    def encode_with_rolls(self, audio: np.ndarray
                          ) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        emb, rolls = self.backend.encode_with_rolls(audio)
        if self.keep_rolls:
            if rolls is None:
                raise EvalError("the backend returned no rolls although the manifest has them")
            self._queue.extend({k: rolls[k][i] for k in ROLL_KEYS} for i in range(len(audio)))
        return emb, rolls

    def start(self, stage: str, embeddings: np.ndarray) -> StageSession:
        return self.backend.start(stage, embeddings)

    def take(self, segments: int) -> dict[str, np.ndarray]:
        """The oldest `segments` segments' rolls, {key: [segments, T, 88]}."""
        rows = [self._queue.popleft() for _ in range(segments)]
        return {k: np.stack([r[k] for r in rows]) for k in ROLL_KEYS}


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class ClipResult:
    name: str
    audio: str
    reference: str
    duration_s: float
    scores: dict[str, dict[str, float] | None]  # "lm", "rolls" -> evaluate()'s keys, or None
    pedal: dict[str, float] | None = None  # metrics.score_pedals, where both sides have pedal


@dataclass
class EvalResult:
    model: str
    manifest: Manifest = field(repr=False)
    manifest_sha256: str
    backend: str
    batch: int
    threads: int | None
    data: str
    clips: list[ClipResult]
    rolls_reason: str | None  # why roll notes were not scored (None: they were)
    report: Report | None
    # the note offsets scored, notes and references alike (runtime/sustain.py OFFSETS)
    sustain: str = SOUNDING

    def mean(self, kind: str) -> dict[str, float] | None:
        """Mean scores over the clips for "lm" or "rolls" (None if not scored)."""
        rows = [c.scores[kind] for c in self.clips]
        return mean_scores(rows) if rows and all(r is not None for r in rows) else None

    def mean_pedal(self) -> dict[str, float] | None:
        """Mean pedal scores over the clips that have them (None if none has)."""
        rows = [c.pedal for c in self.clips if c.pedal is not None]
        return mean_scores(rows) if rows else None

    def rolls_info(self) -> dict[str, Any]:
        spec = self.manifest.encoder.rolls
        return {"scored": self.rolls_reason is None, "reason": self.rolls_reason,
                "thresholds": spec.thresholds.to_dict() if spec else None,
                "tuned": spec.tuned if spec else None,
                "thresholds_from": spec.thresholds_from if spec else None}

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "manifest_sha256": self.manifest_sha256,
            "format_version": self.manifest.format_version,
            "precision": self.manifest.precision, "encoder": self.manifest.encoder.name,
            "backend": self.backend, "batch": self.batch, "threads": self.threads,
            "data": self.data,
            "metrics": {"onset_tolerance_s": ONSET_TOLERANCE, "offset_ratio": OFFSET_RATIO,
                        "offset_min_tolerance_s": OFFSET_MIN_TOLERANCE,
                        "velocity": "mir_eval.transcription_velocity",
                        "sustain": self.sustain},
            "rolls": self.rolls_info(),
            "clips": [asdict(c) for c in self.clips],
            "mean": {kind: self.mean(kind) for kind in KINDS},
            "mean_pedal": self.mean_pedal(),
            "report": self.report.to_dict() if self.report else None,
        }

    def format(self) -> str:
        """The per-clip table (F1 and note counts), the means, and where the roll thresholds
        came from."""
        width = max([len(c.name) for c in self.clips] + [9])
        cols = "     n  onset on+off  +vel"
        lines = [f"{'':<{width}}  {'':>4}  {'LM notes (F1)':<{len(cols)}}  roll notes (F1)",
                 f"{'clip':<{width}}  {'ref':>4}  {cols}  {cols}"]

        def row(name: str, n_ref: float, scores: list[dict[str, float] | None]) -> str:
            parts = [f"{name:<{width}}  {n_ref:>4.0f}"]
            for s in scores:
                if s is None:
                    parts.append(f"{'-':>6}" + f"{'-':>7}" * 3)
                else:
                    parts.append(f"{s['n_pred']:>6.0f}" + "".join(
                        f"{s[f'{m}_f']:>7.3f}" for m in METRICS))
            return "  ".join(parts)

        def n_ref(scores: list[dict[str, float] | None]) -> float:
            return next((s["n_ref"] for s in scores if s is not None), 0.0)

        for c in self.clips:
            scores = [c.scores[k] for k in KINDS]
            lines.append(row(c.name, n_ref(scores), scores))
        means = [self.mean(k) for k in KINDS]
        label = f"mean ({len(self.clips)})"
        lines.append(row(label, n_ref(means), means))
        lines.append(f"note offsets: {SUSTAIN_WORDS[self.sustain]} (--sustain {self.sustain}), "
                     f"in the notes and the references alike")
        pedal = self.mean_pedal()
        if pedal is not None:
            scored = sum(c.pedal is not None for c in self.clips)
            lines.append(f"pedal, {scored} clip(s) with CC64 references: onset F1 "
                         f"{pedal['pedal_onset_f']:.3f}, onset+offset F1 "
                         f"{pedal['pedal_onset_offset_f']:.3f}")
        spec = self.manifest.encoder.rolls
        if self.rolls_reason:
            lines.append(f"roll notes not scored: {self.rolls_reason}")
        elif spec is not None:
            lines.append(f"roll-decoding thresholds: {'tuned' if spec.tuned else 'untuned'}, "
                         f"{spec.thresholds_from}")
        if self.report is not None:
            lines.append(self.report.format())
        return "\n".join(lines)


def write_json(result: EvalResult, path: str | os.PathLike) -> None:
    """Everything, atomically (a temp file beside `path`, then a rename)."""
    text = json.dumps(result.to_dict(), indent=1) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# ---------------------------------------------------------------------------------------------
# Running it


def _rolls_reason(manifest: Manifest, backend: object) -> str | None:
    if manifest.encoder.rolls is None:
        return ("the model's encoder graph has no roll outputs (no encoder.rolls in its "
                "manifest); re-export it with `pianolm export` to measure roll decoding")
    if not callable(getattr(backend, "encode_with_rolls", None)):
        return f"backend {type(backend).__name__} cannot return the encoder's rolls"
    if manifest.encoder.rolls.offsets != SOUNDING:  # the LM's notes are sounding
        return ("the roll notes end at key releases (encoder.rolls.offsets), and beside the "
                "LM's sounding notes no pedal is read to extend them: use --decoder rolls")
    return None


def evaluate_model(data: str | os.PathLike, model_dir: str | os.PathLike | None = None,
                   backend: str = "cpu", batch: int = 1, threads: int | None = None,
                   max_clips: int | None = None, concurrent: bool | None = None,
                   progress: Callable[[int], None] | None = None,
                   speculative: bool | None = None, sustain: str = SOUNDING) -> EvalResult:
    """Transcribe every clip of `data` with the model (None: the shipped default) and score
    its LM notes and, when the model has them, its roll-decoded notes, with the note offsets
    `sustain` names (runtime/sustain.py), references alike.

    Inputs are checked before any model runs: the folder, mir_eval, the sustain choice against
    the model (SustainError, before any audio is read), every clip's audio header and
    reference. `progress(n)` after each batch of n segments.
    """
    if max_clips is not None and max_clips < 1:
        raise EvalError(f"--max-clips must be a positive integer, got {max_clips}")
    clips = find_clips(data)[:max_clips]
    require_mir_eval()
    folder = Path(model_dir) if model_dir is not None else default_model_dir()
    manifest = load_manifest(folder)
    # eval reads a rolls-only model's roll notes, any other model's LM notes (and rolls beside)
    check_sustain(offsets_of(manifest, "rolls" if manifest.rolls_only else "lm"), sustain)
    infos: list[AudioInfo] = [probe_audio(c.audio) for c in clips]
    references = [read_reference(c.reference, sustain) for c in clips]

    raw = open_backend(backend, folder, threads)
    if manifest.rolls_only:
        return _evaluate_rolls_only(clips, infos, references, folder, manifest, raw, backend,
                                    batch, threads, data, progress, sustain)
    reason = _rolls_reason(manifest, raw)
    tap = RollTap(raw, backend, keep_rolls=reason is None)
    transcriber = Transcriber(backend=tap, batch=batch, threads=threads, concurrent=concurrent,
                              decoder="lm", speculative=speculative, sustain=sustain)

    fps = manifest.encoder.frames_per_second
    align = segment_align(raw)  # the Transcriber cuts the segments the tap sees so
    lm_notes: list[list[Note]] = []
    rolls: list[dict[str, np.ndarray] | None] = []
    # Collect first, score after: the report's wall time then measures transcription only.
    for info, result in zip(infos, transcriber.transcribe_many(
            [c.audio for c in clips], progress=progress)):
        lm_notes.append(result.notes)
        rolls.append(join_segments(tap.take(info.num_segments), fps, n_samples=info.samples_16k,
                                   last_start=tail_start(info.samples_16k, align))
                     if tap.keep_rolls else None)

    spec = manifest.encoder.rolls
    results = []
    for clip, info, ref, notes, roll in zip(clips, infos, references, lm_notes, rolls):
        roll_scores = None
        if roll is not None and spec is not None:
            decode = kong_notes if spec.thresholds.method == "kong" else decode_rolls
            roll_scores = score_notes(decode(roll, fps, spec.thresholds), ref)
        results.append(ClipResult(clip.name, str(clip.audio), str(clip.reference),
                                  round(info.duration_s, 3),
                                  {"lm": score_notes(notes, ref), "rolls": roll_scores}))
    return EvalResult(model=str(folder), manifest=manifest,
                      manifest_sha256=file_sha256(folder / MANIFEST_FILE), backend=backend,
                      batch=batch, threads=threads, data=str(data), clips=results,
                      rolls_reason=reason, report=transcriber.report, sustain=sustain)


def _evaluate_rolls_only(clips: list[Clip], infos: list[AudioInfo], references: list[list[Note]],
                         folder: Path, manifest: Manifest, raw: RollBackend, backend: str,
                         batch: int, threads: int | None, data: str | os.PathLike,
                         progress: Callable[[int], None] | None, sustain: str) -> EvalResult:
    """A model without stages: its notes (and pedals) are its roll decoder's, as transcribed."""
    transcriber = Transcriber(backend=raw, batch=batch, threads=threads, decoder="rolls",
                              sustain=sustain)
    transcribed = list(transcriber.transcribe_many([c.audio for c in clips], progress=progress))
    results = []
    for clip, info, ref, result in zip(clips, infos, references, transcribed):
        ref_pedals = read_reference_pedals(clip.reference)
        pedal = None
        if manifest.encoder.rolls and manifest.encoder.rolls.pedal and ref_pedals is not None:
            pedal = score_pedals(result.pedals, ref_pedals)
        results.append(ClipResult(clip.name, str(clip.audio), str(clip.reference),
                                  round(info.duration_s, 3),
                                  {"lm": None, "rolls": score_notes(result.notes, ref)}, pedal))
    return EvalResult(model=str(folder), manifest=manifest,
                      manifest_sha256=file_sha256(folder / MANIFEST_FILE), backend=backend,
                      batch=batch, threads=threads, data=str(data), clips=results,
                      rolls_reason=None, report=transcriber.report, sustain=sustain)
