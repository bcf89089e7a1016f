"""Peers: pianolm's shipped default model next to transkun 2.0 and basic-pitch on the dev set.

    python -m pianolm.export.bench.peers --data ../shared/devset \\
        --json benchmarks/results/peers_cpu_devset.json

Every system transcribes every clip from its audio file (decoding, resampling, model and
note extraction all inside the timed call; loading the weights and one warm-up run on the
first clip outside it), on the CPU with the same thread count. The notes are scored exactly as
`pianolm eval` scores them (runtime/evaluation.py finds the clips and reads the references,
runtime/metrics.py runs mir_eval), so the F1 columns are comparable with the eval JSONs.

Systems:
  pianolm          the shipped default model (engines/default/) through `Transcriber`, with the
                   manifest's default decoder (the encoder's rolls) and, as `pianolm-lm`, the
                   LM stages (`--decoder lm`).
  transkun         transkun 2.0.1 (PyPI `transkun`) with the 2.0 weights its wheel ships,
                   PyTorch on the CPU, the segmenting of its own `transkun` command (16 s
                   windows every 8 s). Its checkpoint is trained without pedal extension and
                   predicts the sustain pedal as events of its own: its notes are extended by
                   its own sustain pedal (runtime/metrics.py `reference_notes`, the rule the
                   dev set's references follow; transkun's `--applyPedalExtensionOnEstimated`),
                   and the pedal events are not scored as notes. `transkun-raw` (not in the
                   default run) scores the unextended notes.
  basic-pitch      basic-pitch 0.4.0 (PyPI `basic-pitch`), the ONNX model its wheel ships, on
                   ONNX Runtime, with its `predict` defaults. It is a multi-instrument model
                   without a velocity head: its velocity is the note's mean frame amplitude
                   x 127, what its own MIDI writer stores, so its velocity F1 says little.

The peers are optional (`pip install -e '.[bench]'`; basic-pitch itself with --no-deps, see
pyproject.toml); one that cannot be imported or loaded is skipped and the JSON says why.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import io
import os
import shlex
import sys
import time
import types
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pianolm.runtime.audio import probe_audio
from pianolm.runtime.evaluation import Clip, find_clips, read_reference
from pianolm.runtime.metrics import (
    METRICS,
    OFFSET_MIN_TOLERANCE,
    OFFSET_RATIO,
    ONSET_TOLERANCE,
    mean_scores,
    reference_notes,
    require_mir_eval,
    score_notes,
)
from pianolm.runtime.notes import Note
from pianolm.runtime.provenance import git_info, package_version, package_versions

from .measure import limit_threads
from .runner import devset_folder, machine, write_json

SCHEMA = "pianolm.bench.peers/1"
SYSTEMS = ("pianolm", "pianolm-lm", "transkun", "basic-pitch")  # the default run
CHOICES = (*SYSTEMS, "transkun-raw")
BENCH_HINT = "pip install -e '.[bench]'"
BASIC_PITCH_HINT = f"{BENCH_HINT} && pip install --no-deps basic-pitch==0.4.0"
VERSION_DISTS = ("pianolm", "numpy", "onnxruntime", "torch", "torchaudio", "mir_eval",
                 "transkun", "basic-pitch", "librosa", "soxr", "soundfile", "threadpoolctl")
MIN_PITCH, MAX_PITCH = 21, 108  # the piano's keys; transkun's pedals come as negative pitches
SUSTAIN = -64  # transkun's sustain pedal (CC 64) as an event pitch


class PeerUnavailable(Exception):
    """A system that cannot run here; the message is the reason, with what to install."""


class Peer(Protocol):
    """One transcription system: load once (untimed), then audio file in, notes out."""

    name: str

    def load(self, threads: int) -> dict[str, Any]:
        """Load the weights; return what the JSON should record about the system (package,
        version, settings). Raises PeerUnavailable."""
        ...

    def transcribe(self, audio: Path) -> list[Note]: ...


def _import(module: str, hint: str) -> types.ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise PeerUnavailable(f"{module} is not installed ({e}): {hint}") from None


# ---------------------------------------------------------------------------------------------
# The systems


@dataclass
class PianolmPeer:
    """The shipped default model through the runtime's own Transcriber (batch 1, CPU)."""

    name: str = "pianolm"
    decoder: str | None = None  # None: the manifest's default_decoder
    model_dir: Path | None = None  # None: engines/default/
    _transcriber: Any = field(default=None, repr=False)

    def load(self, threads: int) -> dict[str, Any]:
        from pianolm.runtime.manifest import MANIFEST_FILE, ManifestError, file_sha256
        from pianolm.runtime.transcriber import Transcriber, default_model_dir

        try:
            folder = self.model_dir or default_model_dir()
            t = Transcriber(folder, backend="cpu", batch=1, threads=threads,
                            decoder=self.decoder)
        except ManifestError as e:  # e.g. a model folder this runtime cannot serve
            raise PeerUnavailable(str(e)) from None
        self._transcriber = t
        manifest = t.backend.manifest
        return {"package": "pianolm", "version": package_version("pianolm"),
                "model": str(self.model_dir or "engines/default"),
                "manifest_sha256": file_sha256(Path(folder) / MANIFEST_FILE),
                "encoder": manifest.encoder.name, "precision": t.precision,
                "settings": {"backend": "onnxruntime cpu", "decoder": t.decoder, "batch": 1,
                             "intra_op_threads": threads, "concurrent_stages": t.concurrent}}

    def transcribe(self, audio: Path) -> list[Note]:
        return self._transcriber.transcribe(str(audio)).notes


def _import_torchaudio() -> str | None:
    """Import torchaudio; None, or why its native extension was left out.

    PyPI's torchaudio wheels are CUDA builds (their extension links libc10_cuda.so; CPU builds
    live on PyTorch's own index, and the newest torchaudio is 2.11), so next to a CPU-only
    torch the import fails in the extension loader. transkun only needs
    `torchaudio.functional.melscale_fbanks`, plain torch code: import torchaudio as its loader
    treats a build without the extension (a stand-in `torchaudio._extension` saying "not
    available")."""
    try:
        importlib.import_module("torchaudio")
        return None
    except OSError as e:
        reason = f"{e}: {e.__cause__}" if e.__cause__ else str(e)
    stub = types.ModuleType("torchaudio._extension")
    stub._IS_TORCHAUDIO_EXT_AVAILABLE = False  # type: ignore[attr-defined]
    stub._IS_ALIGN_AVAILABLE = False  # type: ignore[attr-defined]

    def fail_if_no_align(func: Callable) -> Callable:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"torchaudio's native extension is not loaded ({reason})")
        return fail

    stub.fail_if_no_align = fail_if_no_align  # type: ignore[attr-defined]
    sys.modules["torchaudio._extension"] = stub
    importlib.import_module("torchaudio")
    return f"native extension not loaded ({reason}); transkun uses only melscale_fbanks"


def transkun_notes(events: Iterable[Any], extend_pedal: bool = True) -> list[Note]:
    """transkun's events (start, end, pitch, velocity) -> Notes: keys 21-108 only, offsets
    extended by its sustain-pedal events (pitch -64) unless `extend_pedal` is False."""
    events = list(events)
    notes = [Note(float(e.start), float(e.end), int(e.pitch), int(e.velocity))
             for e in events if MIN_PITCH <= int(e.pitch) <= MAX_PITCH]
    if extend_pedal:
        pedal = [(float(e.start), float(e.end)) for e in events if int(e.pitch) == SUSTAIN]
        notes = reference_notes(notes, pedal)
    return sorted(notes)


@dataclass
class TranskunPeer:
    """transkun 2.0.1 with its bundled weights, as its `transkun` command runs them, except
    that the audio is read with soundfile (pydub needs ffmpeg for FLAC)."""

    name: str = "transkun"
    extend_pedal: bool = True
    _model: Any = field(default=None, repr=False)

    def load(self, threads: int) -> dict[str, Any]:
        _import("transkun", BENCH_HINT)
        moduleconf = _import("moduleconf", BENCH_HINT)
        import torch

        torch.set_num_threads(threads)
        try:
            torchaudio_note = _import_torchaudio()
        except ImportError as e:
            raise PeerUnavailable(f"torchaudio is not installed ({e}): {BENCH_HINT}") from None
        from importlib.resources import files

        weights = files("transkun") / "pretrained"
        conf = moduleconf.parseFromFile(str(weights / "2.0.conf"))["Model"]
        model = conf.module.TransKun(conf=conf.config)
        checkpoint = torch.load(str(weights / "2.0.pt"), map_location="cpu")
        state = checkpoint.get("best_state_dict", checkpoint.get("state_dict"))
        model.load_state_dict(state, strict=False)  # as transkun's own command loads it
        self._model = model.eval()
        return {"package": "transkun", "version": package_version("transkun"),
                "model": "transkun/pretrained/2.0.pt (bundled)",
                "settings": {"device": "cpu", "torch_threads": torch.get_num_threads(),
                             "segment_s": conf.config.segmentSizeInSecond,
                             "hop_s": conf.config.segmentHopSizeInSecond,
                             "sample_rate": model.fs},
                "offsets": ("extended by its own predicted sustain pedal" if self.extend_pedal
                            else "as predicted (its checkpoint: no pedal extension)"),
                "torchaudio": torchaudio_note or "imported normally"}

    def transcribe(self, audio: Path) -> list[Note]:
        import soundfile
        import soxr
        import torch

        samples, rate = soundfile.read(str(audio), dtype="float32", always_2d=True)
        if rate != self._model.fs:
            samples = soxr.resample(samples, rate, self._model.fs)
        # transkun calls torch.utils.checkpoint without use_reentrant: two warnings per window
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
            events = self._model.transcribe(torch.from_numpy(np.ascontiguousarray(samples)))
        return transkun_notes(events, self.extend_pedal)


def basic_pitch_notes(events: Iterable[Sequence[Any]]) -> list[Note]:
    """basic-pitch's note events (start_s, end_s, pitch, amplitude 0-1, bends) -> Notes, the
    velocity being round(127 x amplitude) as its MIDI writer stores it."""
    return sorted(Note(float(e[0]), float(e[1]), int(e[2]),
                       int(np.clip(round(127 * float(e[3])), 1, 127)))
                  for e in events)


@dataclass
class BasicPitchPeer:
    """basic-pitch 0.4.0's bundled ONNX model (no TensorFlow) with its `predict` defaults."""

    name: str = "basic-pitch"
    _model: Any = field(default=None, repr=False)
    _predict: Any = field(default=None, repr=False)

    def load(self, threads: int) -> dict[str, Any]:
        basic_pitch = _import("basic_pitch", BASIC_PITCH_HINT)
        inference = _import("basic_pitch.inference", BASIC_PITCH_HINT)
        import onnxruntime as ort

        path = basic_pitch.build_icassp_2022_model_path(basic_pitch.FilenameSuffix.onnx)
        model = inference.Model(path)
        if model.model_type != inference.Model.MODEL_TYPES.ONNX:
            raise PeerUnavailable(f"basic-pitch loaded {path} as {model.model_type}, not ONNX")
        # basic-pitch opens its session with ONNX Runtime's default threads; reopen it with
        # the thread count every system gets (same file, same provider).
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        model.model = ort.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
        self._model, self._predict = model, inference.predict
        return {"package": "basic-pitch", "version": package_version("basic-pitch"),
                "model": f"basic_pitch/saved_models/icassp_2022/{path.name} (bundled)",
                "settings": {"runtime": "onnxruntime cpu", "intra_op_threads": threads,
                             "predict": "defaults (onset 0.5, frame 0.3, min note 127.7 ms, "
                                        "melodia trick)"},
                "velocity": "round(127 x note amplitude), what basic-pitch writes to MIDI; "
                            "not a trained piano velocity"}

    def transcribe(self, audio: Path) -> list[Note]:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per file
            _, _, events = self._predict(str(audio), self._model)
        return basic_pitch_notes(events)


def make_peers(names: Sequence[str]) -> list[Peer]:
    table: dict[str, Callable[[], Peer]] = {
        "pianolm": lambda: PianolmPeer("pianolm"),
        "pianolm-lm": lambda: PianolmPeer("pianolm-lm", decoder="lm"),
        "transkun": TranskunPeer,
        "transkun-raw": lambda: TranskunPeer("transkun-raw", extend_pedal=False),
        "basic-pitch": BasicPitchPeer,
    }
    return [table[n]() for n in names]


# ---------------------------------------------------------------------------------------------
# Running and scoring


@dataclass
class ClipRun:
    name: str
    audio_s: float
    wall_s: float
    notes: int
    scores: dict[str, float]  # runtime/metrics.py evaluate()'s keys

    @property
    def rtf(self) -> float:
        return self.wall_s / self.audio_s

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rtf": round(self.rtf, 4)}


@dataclass
class SystemRun:
    name: str
    status: str  # "ok" or "skipped"
    reason: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    load_s: float | None = None
    warmup_s: float | None = None
    clips: list[ClipRun] = field(default_factory=list)

    def mean(self) -> dict[str, float] | None:
        """F1 (and P/R) means over clips, as `pianolm eval` reports them; the real-time factor
        over the whole set (total wall / total audio), the clips being of similar length."""
        if not self.clips:
            return None
        audio = sum(c.audio_s for c in self.clips)
        wall = sum(c.wall_s for c in self.clips)
        return {"audio_s": round(audio, 3), "wall_s": round(wall, 3),
                "rtf": round(wall / audio, 4),
                "rtf_mean_of_clips": round(float(np.mean([c.rtf for c in self.clips])), 4),
                **mean_scores(c.scores for c in self.clips)}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "reason": self.reason, **self.info,
                "load_s": self.load_s, "warmup_s": self.warmup_s,
                "clips": [c.to_dict() for c in self.clips], "mean": self.mean()}


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_system(peer: Peer, clips: Sequence[Clip], references: Sequence[list[Note]],
               threads: int, log: Callable[[str], None] = print) -> SystemRun:
    """Load `peer`, warm it up on the first clip, then time and score every clip."""
    try:
        info, load_s = _timed(lambda: peer.load(threads))
    except PeerUnavailable as e:
        log(f"{peer.name}: skipped: {e}")
        return SystemRun(peer.name, "skipped", reason=str(e))
    run = SystemRun(peer.name, "ok", info=info, load_s=round(load_s, 3))
    # First calls pay one-off costs (ONNX Runtime's first run, numba compiling librosa's
    # kernels, torch's allocator): keep them out of the timed runs.
    _, warmup_s = _timed(lambda: peer.transcribe(clips[0].audio))
    run.warmup_s = round(warmup_s, 3)
    for clip, ref in zip(clips, references):
        audio_s = probe_audio(clip.audio).duration_s
        notes, wall = _timed(lambda clip=clip: peer.transcribe(clip.audio))
        run.clips.append(ClipRun(clip.name, round(audio_s, 3), round(wall, 3), len(notes),
                                 score_notes(notes, ref)))
        log(f"{peer.name}: {clip.name} {audio_s:.1f} s audio in {wall:.2f} s, "
            f"{len(notes)} notes, onset F1 {run.clips[-1].scores['onset_f']:.3f}")
    return run


def run_peers(data: Path, systems: Sequence[str] = SYSTEMS, threads: int = 2,
              max_clips: int | None = None, peers: Sequence[Peer] | None = None,
              note: str | None = None, command: str | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole comparison as the JSON report (`peers` overrides `systems`: tests)."""
    clips = find_clips(data)[:max_clips]
    references = [read_reference(c.reference) for c in clips]
    require_mir_eval()
    started = machine()
    runs = []
    with limit_threads(threads):
        for peer in peers if peers is not None else make_peers(systems):
            runs.append(run_system(peer, clips, references, threads, log))
    with contextlib.suppress(OSError):
        started["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return {
        "schema": SCHEMA,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": started,
        "git": git_info(),
        "versions": package_versions(VERSION_DISTS),
        "threads": threads,
        "data": str(data),
        "clips": [c.name for c in clips],
        "timing": "per clip: audio file in, notes out (decode, resample, model, note "
                  "extraction); weights loaded and one warm-up run on the first clip before",
        "metrics": {"onset_tolerance_s": ONSET_TOLERANCE, "offset_ratio": OFFSET_RATIO,
                    "offset_min_tolerance_s": OFFSET_MIN_TOLERANCE,
                    "velocity": "mir_eval.transcription_velocity", "scoring": "runtime/metrics.py"},
        "systems": [r.to_dict() for r in runs],
        "note": note,
    }


def format_table(report: dict[str, Any]) -> str:
    """system | RTF | onset F1 | on+off F1 | on+off+vel F1 (means), skipped ones with why."""
    lines = [f"{'system':<12} {'RTF':>7} {'onset':>7} {'on+off':>7} {'+vel':>7}"]
    for s in report["systems"]:
        m = s["mean"]
        if m is None:
            lines.append(f"{s['name']:<12} skipped: {s['reason']}")
            continue
        lines.append(f"{s['name']:<12} {m['rtf']:>7.3f} "
                     + " ".join(f"{m[f'{k}_f']:>7.3f}" for k in METRICS))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    prog = "python -m pianolm.export.bench.peers"
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=None,
                    help="clips folder (default: $PIANOLM_DEVSET, else ../shared/devset)")
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    ap.add_argument("--systems", nargs="+", choices=CHOICES, default=list(SYSTEMS))
    ap.add_argument("--threads", type=int, default=2, help="threads for every system")
    ap.add_argument("--max-clips", type=int, default=None)
    ap.add_argument("--note", default=None,
                    help="free text for the JSON (e.g. what else ran on the machine)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error("--threads must be positive")
    report = run_peers(devset_folder(args.data), args.systems, args.threads, args.max_clips,
                       note=args.note, command=shlex.join([*prog.split(), *argv]))
    print(format_table(report))
    if args.json is not None:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
