"""`pianolm bench --model DIR`: one model folder as it is, timed phase by phase on the dev set.

    pianolm bench --model engines/kong --backend cpu cuda --threads 2 \\
        --out benchmarks/results/bench_model_kong.json

Any folder `pianolm transcribe` reads: an export with LM stages, or a rolls-only import
(`pianolm import kong`, manifest format 7). Each round transcribes every dev-set clip once per
decoder the folder has, in turn, through `Transcriber` (the path `pianolm transcribe` takes:
files read, resampled, segmented as the manifest says, batched across files), so the phases
are measured side by side on identical work. The phases come from the transcriber's own
`Report` (runtime/report.py), nothing re-implemented:
- the encoder pass: ms per segment, the median over a round's batches;
- roll decoding: the model's own thresholds.method (Kong's post-processor for a Kong import,
  runtime/rolls.py peak picking otherwise), pedal included, ms per segment;
- LM decoding (folders with stages): the hierarchical decode loop, ms per segment;
- the whole transcription: wall time and real-time factor, per decoder.
Figures are medians (with min, max) over `--repeats` rounds after `--warmup` untimed ones.
Each clip's notes are recorded as the sha256 of the TSV `pianolm transcribe --notes tsv`
writes, so a reader can check that what was timed is what the CLI gives.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pianolm.runtime.audio import AudioError, probe_audio
from pianolm.runtime.backend import BackendUnavailable
from pianolm.runtime.evaluation import Clip, EvalError, find_clips
from pianolm.runtime.manifest import DECODERS, Manifest, ManifestError, file_sha256, load_manifest
from pianolm.runtime.provenance import RUNTIME_DISTS, write_report
from pianolm.runtime.report import Report
from pianolm.runtime.transcriber import BACKENDS, Transcriber, Transcription

from .measure import limit_threads, stats

BENCHMARK = "bench_model"
# other names for the runtime's backends: ONNX Runtime, its CUDA IO binding, TensorRT
BACKEND_ALIASES = {"ort": "cpu", "iobinding": "cuda", "trt": "tensorrt"}
DISTS = (*RUNTIME_DISTS, "tensorrt")
DECODE_PHASE = {"rolls": "roll_decode_ms_per_segment", "lm": "lm_decode_ms_per_segment"}


class FolderBenchError(ValueError):
    """An option or folder `pianolm bench --model` cannot work with; the message is one line."""


@dataclass(frozen=True)
class FolderBenchConfig:
    model: Path
    backends: tuple[str, ...] = ("cpu",)  # runtime/transcriber.py BACKENDS, in run order
    decoders: tuple[str, ...] | None = None  # None: every decoder the folder has
    threads: int | None = None
    batch: int = 1  # segments per decoder batch, as `pianolm transcribe --batch`
    devset: Path | None = None  # None: $PIANOLM_DEVSET, else ../shared/devset
    repeats: int = 3
    warmup: int = 1
    out: Path | None = None

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0 or self.batch < 1:
            raise FolderBenchError("--repeats and --batch must be >= 1, --warmup >= 0")
        if self.threads is not None and self.threads < 1:
            raise FolderBenchError("--threads must be >= 1")

    @property
    def out_path(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        return Path("benchmarks/results") / f"{BENCHMARK}_{self.model.resolve().name}.json"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pianolm bench", allow_abbrev=False,
        description="Time one model folder phase by phase on the dev set, side by side in "
                    "one run: the encoder pass, roll decoding (the model's own method), LM "
                    "decoding where the folder has stages, and the whole transcription "
                    "(real-time factor).")
    ap.add_argument("--model", type=Path, required=True, metavar="DIR",
                    help="model folder (`pianolm export` or `pianolm import`)")
    ap.add_argument("--backend", nargs="+", default=["cpu"],
                    choices=[*BACKENDS, *BACKEND_ALIASES],
                    help="runtime backends, each timed in turn (default cpu); ort = cpu, "
                         "iobinding = cuda, trt = tensorrt. One this machine lacks is "
                         "skipped, with the reason recorded")
    ap.add_argument("--decoder", nargs="+", choices=DECODERS,
                    help="decoders to time (default: every one the folder has)")
    ap.add_argument("--threads", type=int, help="CPU threads per graph (default: all cores)")
    ap.add_argument("--batch", type=int, default=1, help="segments decoded together (default 1)")
    ap.add_argument("--devset", type=Path, help="folder of clips with references (default "
                                                "$PIANOLM_DEVSET, else ../shared/devset)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3): medians, "
                                                           "min, max")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument("--out", type=Path, help="JSON to write (default benchmarks/results/"
                                             f"{BENCHMARK}_<folder name>.json)")
    return ap


def preset_only_options() -> set[str]:
    """The preset bench's options that `--model` has no use for (it builds its own models)."""
    from .config import build_parser as preset_parser  # torch: only on this error path

    mine = {s for a in build_parser()._actions for s in a.option_strings}
    return {s for a in preset_parser()._actions for s in a.option_strings} - mine


def parse_folder_config(argv: Sequence[str]) -> FolderBenchConfig:
    """Options -> FolderBenchConfig; FolderBenchError when preset options are mixed in."""
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    if rest:
        mixed = sorted({r.split("=")[0] for r in rest} & preset_only_options())
        if mixed:
            raise FolderBenchError(f"{' '.join(mixed)} build models from presets; --model DIR "
                                   "times that folder as it is: give one or the other")
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    backends = tuple(dict.fromkeys(BACKEND_ALIASES.get(b, b) for b in args.backend))
    return FolderBenchConfig(
        model=args.model, backends=backends,
        decoders=None if args.decoder is None else tuple(dict.fromkeys(args.decoder)),
        threads=args.threads, batch=args.batch, devset=args.devset, repeats=args.repeats,
        warmup=args.warmup, out=args.out)


def folder_decoders(manifest: Manifest, requested: tuple[str, ...] | None) -> tuple[str, ...]:
    """The decoders to time: those asked for, each checked against what the folder holds."""
    # the LM stages read pianolm's own segments only (runtime/transcriber.py)
    has = {"rolls": manifest.encoder.rolls is not None,
           "lm": not manifest.rolls_only and manifest.segmenting == "pianolm"}
    if requested is None:
        return tuple(d for d in DECODERS if has[d])
    if "lm" in requested and not has["lm"]:
        why = ("is a rolls-only model (no LM stages)" if manifest.rolls_only else
               f"cuts audio as {manifest.segmenting!r}, which the LM stages do not read")
        raise FolderBenchError(f"{manifest.folder} {why}: --decoder lm cannot run on it; use "
                               "--decoder rolls")
    if "rolls" in requested and not has["rolls"]:
        raise FolderBenchError(f"{manifest.folder}: its encoder graph outputs no piano rolls "
                               "(manifest encoder.rolls): --decoder rolls cannot run on it")
    return requested


@dataclass
class Round:
    """One timed transcription of every clip with one decoder."""

    report: Report
    segments: int
    digests: list[str]  # per clip: sha256 of its notes TSV (`pianolm transcribe --notes tsv`)
    results: list[Transcription]

    @property
    def decode_ms_per_segment(self) -> float:
        return self.report.decode_s * 1e3 / self.segments


def transcribe_round(transcriber: Transcriber, clips: list[Clip], scratch: Path) -> Round:
    """Every clip through `transcriber.transcribe_many` (timed by its Report); the notes are
    written and hashed after the clock stops (the Report's wall time includes the caller's)."""
    batches: list[int] = []  # segments per decoded batch
    results = list(transcriber.transcribe_many([str(c.audio) for c in clips],
                                               progress=batches.append))
    report = transcriber.report
    assert report is not None
    digests = []
    for clip, result in zip(clips, results):
        assert isinstance(result, Transcription)  # keep_going=False: a failure raises
        path = scratch / f"{clip.name}.tsv"
        result.write_notes(path, "tsv")
        digests.append(file_sha256(path))
    return Round(report, sum(batches), digests, results)


@dataclass
class DecoderRuns:
    """A decoder's transcriber on one backend and its timed rounds."""

    decoder: str
    transcriber: Transcriber
    rounds: list[Round] = field(default_factory=list)

    def figures(self, clips: list[Clip]) -> dict:
        last = self.rounds[-1]
        return {
            "wall_s": stats(r.report.wall_s for r in self.rounds),
            "real_time_factor": stats((r.report.real_time_factor for r in self.rounds), 1, 5),
            "encoder_ms_per_segment": stats(r.report.encoder_ms_per_segment
                                            for r in self.rounds),
            "decode_ms_per_segment": stats((r.decode_ms_per_segment for r in self.rounds),
                                           1, 4),
            "segments": last.segments,
            "notes": sum(len(t.notes) for t in last.results),
            "pedals": sum(len(t.pedals) for t in last.results),
            # decoding is deterministic: the same notes in every round, or the figures lie
            "identical_across_rounds": all(r.digests == last.digests for r in self.rounds),
            "clips": [{"name": c.name, "notes": len(t.notes), "pedals": len(t.pedals),
                       "notes_tsv_sha256": d}
                      for c, t, d in zip(clips, last.results, last.digests)],
            "report": strict_json(last.report.to_dict()),  # the last round's
        }


def strict_json(report: dict) -> dict:
    """Report.to_dict() with its NaN ratios (e.g. tokens per call where no decoder ran) as
    null, so the JSON stays readable by strict parsers."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in report.items()}


def phases(runs: dict[str, DecoderRuns], default_decoder: str) -> dict:
    """The phases side by side: the encoder (every round of every decoder runs the same
    graph on the same segments), each decoder's own decoding, the whole transcription."""
    out = {"encoder_ms_per_segment": stats(r.report.encoder_ms_per_segment
                                           for d in runs.values() for r in d.rounds)}
    for name, d in runs.items():
        out[DECODE_PHASE[name]] = stats((r.decode_ms_per_segment for r in d.rounds), 1, 4)
    whole = runs.get(default_decoder) or next(iter(runs.values()))
    out["transcribe_real_time_factor"] = stats(
        (r.report.real_time_factor for r in whole.rounds), 1, 5)
    out["transcribe_decoder"] = whole.decoder
    return out


def time_backend(cfg: FolderBenchConfig, manifest: Manifest, decoders: tuple[str, ...],
                 backend: str, clips: list[Clip]) -> dict:
    """One backend: a transcriber per decoder, warmed up, then the rounds in turn."""
    try:
        runs = {d: DecoderRuns(d, Transcriber(manifest.folder, backend=backend, batch=cfg.batch,
                                              threads=cfg.threads, decoder=d))
                for d in decoders}
    except (BackendUnavailable, ManifestError) as e:  # no GPU, no TensorRT engines built, ...
        return {"status": "skipped", "reason": str(e).splitlines()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(cfg.warmup):
            for d in runs.values():
                transcribe_round(d.transcriber, clips, Path(tmp))
        for _ in range(cfg.repeats):  # decoders alternate: a load change hits them all alike
            for d in runs.values():
                d.rounds.append(transcribe_round(d.transcriber, clips, Path(tmp)))
    first = next(iter(runs.values())).transcriber
    return {"status": "ok", "precision": first.precision,
            "concurrent": runs["lm"].transcriber.concurrent if "lm" in runs else None,
            "phases": phases(runs, manifest.default_decoder),
            "decoders": {name: d.figures(clips) for name, d in runs.items()}}


def model_summary(manifest: Manifest) -> dict:
    rolls = manifest.encoder.rolls
    return {"folder": str(manifest.folder), "encoder": manifest.encoder.name,
            "precision": manifest.precision, "format_version": manifest.format_version,
            "stages": list(manifest.stage_names), "default_decoder": manifest.default_decoder,
            "segmenting": manifest.segmenting,
            "roll_method": None if rolls is None else rolls.thresholds.method,
            "pedal": bool(rolls and rolls.pedal), "source": manifest.source.to_dict()}


def run_folder_bench(cfg: FolderBenchConfig, log: Callable[[str], None] = print) -> dict:
    """The whole run -> the report's result (also written to cfg.out_path)."""
    from pianolm.export.train.evaluate import devset_path  # $PIANOLM_DEVSET, ../shared/devset

    manifest = load_manifest(cfg.model)
    decoders = folder_decoders(manifest, cfg.decoders)
    devset = devset_path(cfg.devset)
    clips = find_clips(devset)
    audio_s = sum(probe_audio(c.audio).duration_s for c in clips)
    result = {"model": model_summary(manifest), "devset": str(devset),
              "clips": [c.name for c in clips], "audio_s": round(audio_s, 3),
              "config": {**asdict(cfg), "model": str(cfg.model), "devset": str(devset),
                         "out": str(cfg.out_path)},
              "timing": "per round: every clip's file in, notes out, through Transcriber "
                        "(decode and resampling included); phases from its Report",
              "backends": {}}
    with limit_threads(cfg.threads):
        for backend in cfg.backends:
            log(f"{backend}: timing {', '.join(decoders)} on {len(clips)} clip(s), "
                f"{audio_s:.1f} s of audio")
            result["backends"][backend] = entry = time_backend(cfg, manifest, decoders,
                                                               backend, clips)
            log(format_entry(backend, entry))
    if not any(e["status"] == "ok" for e in result["backends"].values()):
        reasons = "; ".join(f"{b}: {e['reason']}" for b, e in result["backends"].items())
        raise FolderBenchError(f"no backend could run: {reasons}")
    write_report(cfg.out_path, BENCHMARK, result, DISTS)
    log(f"wrote {cfg.out_path}")
    return result


def format_entry(backend: str, entry: dict) -> str:
    """A backend's phases in a few lines for the terminal."""
    if entry["status"] != "ok":
        return f"  {backend}: skipped: {entry['reason']}"
    lines = []
    for name, value in entry["phases"].items():
        if isinstance(value, dict):
            lines.append(f"  {backend:<8} {name:<32} median {value['median']:>10} "
                         f"(min {value['min']}, max {value['max']}, n {value['n']})")
    return "\n".join(lines)


def main_folder_bench(argv: Sequence[str]) -> int:
    """`pianolm bench --model DIR ...`: 0 on success, 2 (one line on stderr) on a bad folder,
    option, dev set or input."""
    try:
        run_folder_bench(parse_folder_config(argv))
    except (AudioError, BackendUnavailable, EvalError, FolderBenchError, ManifestError,
            OSError) as e:
        print(f"pianolm bench: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0
