"""The `pianolm` command line.

Runtime subcommands need only the runtime's dependencies. Torch-side subcommands (info, export,
train, ...) import pianolm.export lazily and say which extra to install when torch is missing.
Every user error ends with one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


class RunFailed(Exception):
    """Some inputs failed (each already reported on its own line): the summary line, exit 1."""


@contextmanager
def _torch_side_hint() -> Iterator[None]:
    """Torch-side code run without the export extra (at import or later, e.g. when a
    subcommand builds its parser for --help): the install hint, not a traceback."""
    try:
        yield
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in {"torch", "onnx", "onnxscript", "safetensors"}:
            raise UserError(f"this command needs the torch side: pip install 'pianolm[export]' "
                            f"({e.name} is not installed)") from None
        raise


def _torch_side(module: str) -> object:
    with _torch_side_hint():
        return importlib.import_module(f"pianolm.export.{module}")


def cmd_info(args: argparse.Namespace) -> None:
    from pianolm.runtime.transcriber import default_model_dir

    system = _torch_side("system")
    preset, encoder = args.preset, args.encoder
    if preset is None or encoder is None:  # the shipped model's, what transcribe runs
        manifest = json.loads((default_model_dir() / "manifest.json").read_text())
        shipped_preset, shipped_encoder = system.shipped_sizes(manifest)
        preset, encoder = preset or shipped_preset, encoder or shipped_encoder
    print(system.describe_parameters(preset, encoder))


def plan_outputs(inputs: list[str], out: str | None, suffix: str = ".mid") -> list[Path]:
    """Where each input's MIDI goes: OUT itself for one input (or inside OUT if it is a
    folder), OUT/<name>.mid for several, beside each input without -o."""
    if out is None:
        targets = [Path(i).with_suffix(suffix) for i in inputs]
    elif len(inputs) == 1 and not Path(out).is_dir() and Path(out).suffix:
        targets = [Path(out)]
    else:
        if Path(out).exists() and not Path(out).is_dir():
            raise UserError(f"{out}: not a folder (several inputs need -o to name a folder)")
        targets = [Path(out) / Path(i).with_suffix(suffix).name for i in inputs]
    seen: dict[Path, str] = {}
    for source, target in zip(inputs, targets):
        key = target.resolve()
        if key in seen:
            raise UserError(f"{seen[key]} and {source} would both be written to {target}")
        seen[key] = source
    return targets


def _refuse_overwrite(paths: list[Path], overwrite: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UserError(f"{existing[0]} exists{more}; pass --overwrite to replace it")


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="exported model folder (default: the shipped model)")
    parser.add_argument("--backend", default="cpu", choices=["cpu", "cuda", "tensorrt"],
                        help=BACKEND_HELP)
    parser.add_argument("--threads", type=int, help="CPU threads per graph (default: all "
                        "cores)")


def _decoder_option(parser: argparse.ArgumentParser) -> None:
    # manifest.DECODERS, spelled out: building the parser imports nothing (fast --help)
    parser.add_argument("--decoder", choices=["lm", "rolls"],
                        help="notes from the LM stages or the encoder's own rolls (default: "
                             "the model's manifest, default_decoder)")


def _decode_options(parser: argparse.ArgumentParser) -> None:
    # decode.SCHEDULES, spelled out: building the parser imports nothing (fast --help)
    parser.add_argument("--schedule", choices=["auto", "concurrent", "sequential"],
                        default="auto", help="velocity and offset stages side by side or one "
                        "after the other (auto: side by side on a GPU, or on a CPU with "
                        "--threads set and twice that many cores)")
    parser.add_argument("--speculative", choices=["auto", "on", "off"], default="auto",
                        help="LM stages verify drafts from the encoder's rolls: the same "
                             "notes in fewer decoder calls (auto: on a GPU backend, where "
                             "that pays; README \"Speculative decoding\")")


def _sustain_option(parser: argparse.ArgumentParser) -> None:
    # sustain.OFFSETS, spelled out: building the parser imports nothing (fast --help)
    parser.add_argument("--sustain", choices=["sounding", "key"], default="sounding",
                        help="note offsets: sounding (default; held by the sustain pedal "
                             "until it goes up or the key is struck again: the convention of "
                             "the published F1s) or key (the key release, for writing scores; "
                             "only from a model whose notes end at key releases, manifest "
                             "encoder.rolls.offsets; docs/import.md)")


def _check_sustain(model: str | None, decoder: str | None, sustain: str) -> None:
    """Refuse, in one line and before any audio is read, a --sustain the model's notes
    cannot give (runtime/sustain.py). Every model's notes can be given "sounding"."""
    if sustain == "sounding":
        return
    from .manifest import ManifestError, load_manifest
    from .sustain import SustainError, check_sustain, offsets_of
    from .transcriber import default_model_dir

    try:
        manifest = load_manifest(model or default_model_dir())
        check_sustain(offsets_of(manifest, decoder), sustain)
    except (ManifestError, SustainError) as e:
        raise UserError(str(e).splitlines()[0]) from None


def _concurrent(schedule: str) -> bool | None:
    return {"auto": None, "concurrent": True, "sequential": False}[schedule]


def _speculative(choice: str) -> bool | None:
    return {"auto": None, "on": True, "off": False}[choice]


def _check_writable(path: Path) -> None:
    """Fail now, naming the user's path, if `path` could not be written at the end of a run:
    its nearest existing folder must be a writable folder (missing ones are created)."""
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{path}: cannot write there ({parent} is not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot write there ({parent} is not writable)")


def _refuse_inputs(inputs: list[str], outputs: list[Path]) -> None:
    """An output naming an input would replace the recording with MIDI: never."""
    sources = {Path(i).resolve(): i for i in inputs}
    for out in outputs:
        if out.resolve() in sources:
            raise UserError(f"{out}: is an input; refusing to write over it")


def cmd_transcribe(args: argparse.Namespace) -> None:
    from .audio import AudioError, probe_audio
    from .backend import BackendUnavailable
    from .manifest import ManifestError
    from .midi import MidiError, atomic_write
    from .transcriber import Failure, Transcriber

    if args.batch < 1 or (args.threads is not None and args.threads < 1):
        raise UserError("--batch and --threads must be positive integers")
    _check_sustain(args.model, args.decoder, args.sustain)
    failures: list[str] = []
    # one input, or --fail-fast: its failure is the run's one error line (exit 2)
    stop_at_failure = args.fail_fast or len(args.audio) == 1
    try:
        midi_paths = plan_outputs(args.audio, args.output)
        note_paths = [p.with_suffix(f".{args.notes}") for p in midi_paths] if args.notes else []
        extra = [Path(args.report_json)] if args.report_json else []
        _refuse_inputs(args.audio, midi_paths + note_paths + extra)
        for path in midi_paths + note_paths + extra:  # every output checked before any work
            _check_writable(path)
        todo = list(range(len(args.audio)))
        if args.skip_existing:  # a re-run transcribes only what is not written yet
            todo = [k for k in todo if not (midi_paths[k].exists() and all(
                p.exists() for p in note_paths[k:k + 1]))]
            for k in sorted(set(range(len(args.audio))) - set(todo)):
                print(f"{args.audio[k]}: skipped ({midi_paths[k]} exists)")
        outputs = [midi_paths[k] for k in todo] + [note_paths[k] for k in todo if note_paths]
        _refuse_overwrite(outputs + extra, args.overwrite)
        infos = {}
        for k in todo:  # every input checked before work; a bad one fails alone
            try:
                infos[k] = probe_audio(args.audio[k])
            except AudioError as e:
                if stop_at_failure:
                    raise
                failures.append(str(e))
                print(f"pianolm: error: {e}", file=sys.stderr)
        todo = [k for k in todo if k in infos]
        transcriber = Transcriber(args.model, backend=args.backend, batch=args.batch,
                                  threads=args.threads, decoder=args.decoder,
                                  concurrent=_concurrent(args.schedule),
                                  speculative=_speculative(args.speculative),
                                  sustain=args.sustain)
        from tqdm import tqdm

        total = sum(infos[k].num_segments for k in todo)
        with tqdm(total=total, unit="segment", disable=not sys.stderr.isatty(),
                  desc="transcribing") as bar:
            results = transcriber.transcribe_many([args.audio[k] for k in todo],
                                                  progress=bar.update,
                                                  keep_going=not stop_at_failure)
            for k, result in zip(todo, results):
                if isinstance(result, Failure):
                    failures.append(result.error)
                    bar.write(f"pianolm: error: {result.error}", file=sys.stderr)
                    continue
                midi_paths[k].parent.mkdir(parents=True, exist_ok=True)
                result.write_midi(midi_paths[k])
                if args.notes:
                    result.write_notes(note_paths[k], args.notes)
                pedals = f", {len(result.pedals)} pedal presses" if result.pedals else ""
                bar.write(f"{result.source} -> {midi_paths[k]} ({len(result.notes)} notes"
                          f"{pedals})", file=sys.stdout)
    except (AudioError, BackendUnavailable, ManifestError, MidiError, OSError) as e:
        raise UserError(str(e).splitlines()[0] if str(e) else repr(e)) from None
    report = transcriber.report
    if report is not None and report.files:
        print(report.format())
        if args.report_json:
            Path(args.report_json).parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(report.to_dict(), indent=1) + "\n"
            atomic_write(args.report_json, lambda f: f.write(text.encode("utf-8")))
    if failures:
        raise RunFailed(f"{len(failures)} of {len(args.audio)} inputs failed; the others "
                        "were written")


def _stream_source(args: argparse.Namespace) -> Iterator:
    """The stream's float32 mono 16 kHz chunks: a file (read as it plays), stdin's PCM, or
    the microphone."""
    from .live_io import mic_chunks
    from .stream import file_chunks, pcm_chunks

    pcm_flags = [f"--{n}" for n, v in (("rate", args.rate), ("channels", args.channels),
                                       ("sample-format", args.sample_format)) if v is not None]
    if args.source == "mic":
        if pcm_flags:
            raise UserError(f"{pcm_flags[0]} describes raw PCM on stdin (SOURCE -); the "
                            "microphone is read at its own rate")
        return mic_chunks()
    if args.source != "-":
        if pcm_flags:
            raise UserError(f"{pcm_flags[0]} describes raw PCM on stdin (SOURCE -); a file's "
                            "header gives its own")
        return file_chunks(args.source)
    rate = 16000 if args.rate is None else args.rate
    channels = 1 if args.channels is None else args.channels
    if rate < 1 or channels < 1:
        raise UserError("--rate and --channels must be positive integers")
    stdin = sys.stdin.buffer
    read = getattr(stdin, "read1", stdin.read)  # what has arrived, not a whole block
    return pcm_chunks(read, rate, channels, args.sample_format or "s16le")


def cmd_stream(args: argparse.Namespace) -> None:
    from .audio import AudioError
    from .backend import BackendUnavailable
    from .live_io import LiveDeviceError, MidiOut
    from .manifest import ManifestError
    from .midi import MidiError, write_midi
    from .stream import Event, Performance, StreamTranscriber, paced
    from .transcriber import default_model_dir, open_backend

    if args.decoder != "rolls":
        raise UserError("--decoder lm: streaming with the LM stages is not built yet; use "
                        "--decoder rolls")
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be a positive integer")
    out = Path(args.output) if args.output else None
    try:
        if out is not None:
            if args.source not in ("-", "mic"):
                _refuse_inputs([args.source], [out])
            _refuse_overwrite([out], args.overwrite)
            _check_writable(out)
        backend = open_backend("cpu", args.model or default_model_dir(), args.threads,
                               decoder="rolls")
        st = StreamTranscriber(backend, hop_s=args.hop, lookahead_s=args.lookahead,
                               window_s=args.window)
        port = MidiOut(args.midi_out) if args.midi_out else None
        chunks = _stream_source(args)  # last: a microphone starts recording when opened
    except (AudioError, BackendUnavailable, LiveDeviceError, ManifestError, OSError,
            ValueError) as e:
        raise UserError(str(e).splitlines()[0] if str(e) else repr(e)) from None

    def arrived(chunks: Iterator) -> Iterator:
        for chunk in chunks:
            st.mark_start()  # emitted_at counts from the first sample read
            yield chunk

    performance = Performance() if out is not None else None  # for -o only

    def emit(events: list[Event]) -> None:
        for event in events:
            print(json.dumps(event.to_json()), flush=True)
            if port is not None:
                port.send(event)
            if performance is not None:
                performance.add(event)

    source = arrived(chunks)
    if args.pace == "realtime" and args.source not in ("-", "mic"):  # those have their own
        source = paced(source)
    try:
        try:
            for chunk in source:
                emit(st.push(chunk))
        except KeyboardInterrupt:  # Ctrl-C ends a live stream: flush it as end of input
            pass
        emit(st.finish())
        if st.seconds == 0:
            raise UserError(f"{args.source}: no audio was read")
        if out is not None and performance is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_midi(performance.notes, out, pedals=performance.pedals)
    except BrokenPipeError:
        raise  # the reader left (`| head`): main() exits quietly
    except (AudioError, MidiError, OSError, ValueError) as e:
        raise UserError(str(e).splitlines()[0] if str(e) else repr(e)) from None
    finally:  # the microphone stops recording, the MIDI port is let go
        if hasattr(chunks, "close"):
            chunks.close()
        if port is not None:
            port.close()


def cmd_eval(args: argparse.Namespace) -> None:
    from .audio import AudioError
    from .backend import BackendUnavailable
    from .evaluation import EvalError, evaluate_model, write_json
    from .manifest import ManifestError
    from .metrics import MetricsUnavailable
    from .midi import MidiError
    from .sustain import SustainError

    if args.batch < 1 or (args.threads is not None and args.threads < 1):
        raise UserError("--batch and --threads must be positive integers")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise UserError(f"{args.json}: its folder does not exist")  # before a long run
    try:
        from tqdm import tqdm

        with tqdm(unit="segment", disable=not sys.stderr.isatty(), desc="evaluating") as bar:
            result = evaluate_model(args.data, args.model, backend=args.backend,
                                    batch=args.batch, threads=args.threads,
                                    concurrent=_concurrent(args.schedule),
                                    speculative=_speculative(args.speculative),
                                    max_clips=args.max_clips, progress=bar.update,
                                    sustain=args.sustain)
        print(result.format())
        if args.json:
            write_json(result, args.json)
    except (AudioError, BackendUnavailable, EvalError, ManifestError, MetricsUnavailable,
            MidiError, OSError, SustainError) as e:
        raise UserError(str(e).splitlines()[0] if str(e) else repr(e)) from None


def cmd_serve(args: argparse.Namespace) -> None:
    import socket

    from .backend import BackendUnavailable
    from .manifest import ManifestError
    from .transcriber import Transcriber

    if min(args.batch, args.max_queue, args.max_streams) < 1 or args.max_wait_ms < 0 \
            or min(args.max_body_mb, args.max_frame_kb, args.stream_idle_s) <= 0 \
            or (args.threads is not None and args.threads < 1):
        raise UserError("--batch, --max-queue, --max-streams and --threads must be positive, "
                        "--max-wait-ms at least 0, --max-body-mb, --max-frame-kb and "
                        "--stream-idle-s above 0")
    try:
        from .server import ServeConfig, create_app, run
        from .stream_server import StreamLimits
    except ModuleNotFoundError as e:
        raise UserError(f"pianolm serve needs the serve extra: pip install 'pianolm[serve]' "
                        f"({e.name} is not installed)") from None
    try:  # bound before the model loads: a port in use is one line, at once
        sock = socket.create_server((args.host, args.port))
    except OSError as e:
        raise UserError(f"{args.host}:{args.port}: cannot listen there ({e.strerror or e})"
                        ) from None
    try:
        transcriber = Transcriber(args.model, backend=args.backend, batch=args.batch,
                                  threads=args.threads, decoder=args.decoder,
                                  concurrent=_concurrent(args.schedule),
                                  speculative=_speculative(args.speculative))
    except (BackendUnavailable, ManifestError, OSError, ValueError) as e:
        sock.close()
        raise UserError(str(e).splitlines()[0] if str(e) else repr(e)) from None
    streams = StreamLimits(max_streams=args.max_streams, max_frame_kb=args.max_frame_kb,
                           idle_s=args.stream_idle_s)
    config = ServeConfig(max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                         max_body_mb=args.max_body_mb, streams=streams)
    host, port = sock.getsockname()[:2]
    print(f"pianolm serve: http://{host}:{port}/v1/transcribe (decoder {transcriber.decoder}, "
          f"backend {transcriber.backend_name}, batch {args.batch})", flush=True)
    run(create_app(transcriber, config), sock, args.log_level)  # until SIGTERM / Ctrl-C


def cmd_corpus(args: argparse.Namespace) -> None:
    if min(args.actors, args.batch, args.threads_per_actor) < 1:
        raise UserError("--actors, --batch and --threads-per-actor must be positive integers")
    _check_sustain(args.model, args.decoder, args.sustain)  # before OUT is made
    try:
        import ray  # noqa: F401  (the scale extra)

        from .corpus import CorpusConfig, CorpusError, run_corpus
    except ModuleNotFoundError as e:
        raise UserError(f"pianolm corpus needs the scale extra: pip install 'pianolm[scale]' "
                        f"({e.name} is not installed)") from None
    from tqdm import tqdm

    config = CorpusConfig(out_dir=args.output, model=args.model, backend=args.backend,
                          batch=args.batch, threads=args.threads_per_actor,
                          decoder=args.decoder, notes=args.notes, sustain=args.sustain)
    bar = tqdm(unit="file", disable=not sys.stderr.isatty(), desc="transcribing")
    hours = [0.0]

    def on_plan(todo: int, skipped: int) -> None:
        bar.reset(total=todo)
        if skipped:
            bar.write(f"{skipped} input(s) already done with this model: skipped")

    def on_row(row: dict) -> None:
        hours[0] += row["audio_s"] / 3600
        bar.set_postfix_str(f"{hours[0]:.2f} h of audio")
        bar.update()
        if row["status"] != "ok":
            bar.write(f"pianolm: error: {row['error']}", file=sys.stderr)

    try:
        with bar:
            summary = run_corpus(args.input, config, glob=args.glob, actors=args.actors,
                                 ray_address=args.ray_address, retry=args.retry,
                                 on_plan=on_plan, on_row=on_row)
    except (CorpusError, OSError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    except Exception as e:  # Ray itself failed (no cluster at --ray-address, ...)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RunFailed(f"error: the Ray pipeline failed: {reason}") from None
    print(summary.format())
    if summary.failed or summary.failed_before:  # the collection is not all transcribed
        raise RunFailed(f"{summary.failed + summary.failed_before} input(s) failed (rows in "
                        f"{Path(args.output) / 'results.parquet'})")


# Commands that parse their own options: `pianolm NAME ...` hands every later word to an entry
# function. NAME -> (module, entry function, help). Modules under pianolm.export are the torch
# side; build-engines is the runtime's (runtime/trt_build.py: the GPU server needs no torch).
PASS_THROUGH = {
    "data": ("pianolm.export.data.dataset", "main_render",
             "training data: `pianolm data render --help`"),
    "train": ("pianolm.export.train", "main_train",
              "train encoder / LM stages: `pianolm train --help`"),
    "export": ("pianolm.export.onnx_export", "main_export",
               "export a model to ONNX: `pianolm export --help`"),
    "import": ("pianolm.export.importing", "main_import",
               "a peer's checkpoint (Kong et al.'s CRNN) -> a model folder: "
               "`pianolm import --help`"),
    "build-engines": ("pianolm.runtime.trt_build", "main_build_engines",
                      "TensorRT engines for an export: `pianolm build-engines --help`"),
    "bench": ("pianolm.export.bench", "main_bench",
              "measure decode cost side by side: `pianolm bench --help`"),
}


def cmd_pass_through(args: argparse.Namespace) -> None:
    module, entry, _ = PASS_THROUGH[args.command]
    rest = list(args.rest)
    if args.command == "data":  # the only data action so far
        if rest[:1] != ["render"]:
            raise UserError("usage: pianolm data render --out DIR [options]")
        rest = rest[1:]
    torch_side = module.startswith("pianolm.export.")
    with _torch_side_hint() if torch_side else nullcontext():
        code = getattr(importlib.import_module(module), entry)(rest)
    if code:
        raise SystemExit(code)


BACKEND_HELP = ("cpu: ONNX Runtime on the CPU (default); cuda: ONNX Runtime CUDA with IO "
                "binding (pip install 'pianolm[gpu]'); tensorrt: engines from `pianolm "
                "build-engines`")


def build_parser() -> argparse.ArgumentParser:
    from pianolm import __version__

    parser = argparse.ArgumentParser(prog="pianolm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pianolm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter counts of a model preset, per part")
    info.add_argument("--preset", choices=["mini", "tiny", "small", "base"],
                      help="decoder size (default: the shipped model's)")
    info.add_argument("--encoder", choices=["crnn", "hppnet", "hppnet-cpu", "hppnet-cpu-vl"],
                      help="encoder (default: the shipped model's)")
    info.set_defaults(func=cmd_info)

    tr = sub.add_parser("transcribe", help="audio files -> MIDI, with a latency report",
                        description="Transcribe audio files to MIDI with an exported model "
                        "(default: the shipped model in engines/default/).")
    tr.add_argument("audio", nargs="+", help="audio files (wav, flac, ogg, ...; any rate)")
    tr.add_argument("-o", "--output", help="output .mid for one input, or a folder "
                    "(default: beside each input)")
    _model_options(tr)
    _decoder_option(tr)
    tr.add_argument("--batch", type=int, default=1, help="segments decoded together, across "
                    "files (throughput mode)")
    _decode_options(tr)
    _sustain_option(tr)
    tr.add_argument("--notes", choices=["tsv", "json"], help="also write the notes as a table")
    tr.add_argument("--report-json", help="write the latency report to this JSON file")
    tr.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    tr.add_argument("--skip-existing", action="store_true", help="leave inputs whose outputs "
                    "exist alone (a re-run after a partial failure)")
    tr.add_argument("--fail-fast", action="store_true", help="stop at the first input that "
                    "fails (default: go on with the others, exit 1 at the end)")
    tr.set_defaults(func=cmd_transcribe)

    st = sub.add_parser("stream", help="live transcription: note events as JSON lines while "
                        "the audio plays", description="Transcribe a live stream: an audio "
                        "file played as live input, or raw PCM on stdin (SOURCE -). One JSON "
                        "event per line on stdout (README, Live transcription).")
    st.add_argument("source", metavar="SOURCE", help="an audio file, - (raw PCM on stdin), "
                    "or mic (the default input device; the live extra)")
    st.add_argument("-o", "--output", help="also write the whole performance to this .mid "
                    "at the end")
    st.add_argument("--model", help="exported model folder (default: the shipped model)")
    st.add_argument("--threads", type=int, help="CPU threads for the encoder (default: all "
                    "cores)")
    st.add_argument("--decoder", choices=["lm", "rolls"], default="rolls",
                    help="rolls (default; the LM path is not built yet)")
    st.add_argument("--format", choices=["jsonl"], default="jsonl", help="event format")
    st.add_argument("--midi-out", metavar="PORT", help="also send the events to this MIDI "
                    "output port, or a new virtual port of that name (the live extra)")
    st.add_argument("--pace", choices=["realtime", "fast"], default="realtime",
                    help="a file source: played at the audio clock (realtime, default) or "
                    "as fast as it transcribes (fast: tests, batch use)")
    st.add_argument("--hop", type=float, default=0.2, help="seconds between encoder runs "
                    "(default 0.2): an encoder pass per hop")
    st.add_argument("--lookahead", type=float, default=0.3, help="seconds of right context "
                    "a frame waits for (default 0.3); notes come lookahead to lookahead + "
                    "hop seconds after they sound, plus the encoder's time")
    st.add_argument("--window", type=float, default=1.5, help="seconds of audio per encoder "
                    "run (default 1.5; at most the model's segment, 10 s): shorter costs less "
                    "per hop, with less left context")
    st.add_argument("--rate", type=int, help="SOURCE -: sample rate in Hz (default 16000)")
    st.add_argument("--channels", type=int, help="SOURCE -: interleaved channels (default 1)")
    st.add_argument("--sample-format", choices=["s16le", "f32le"],
                    help="SOURCE -: sample format (default s16le)")
    st.add_argument("--overwrite", action="store_true", help="replace an existing -o file")
    st.set_defaults(func=cmd_stream)

    ev = sub.add_parser("eval", help="score a model on a folder of clips with references",
                        description="Transcribe every audio file of --data and score it against "
                        "the reference of the same stem (.tsv, else .mid/.midi with the pedal): "
                        "onset, onset+offset and onset+offset+velocity F1 (mir_eval), for the "
                        "LM's notes and the encoder's roll-decoded notes.")
    ev.add_argument("--data", required=True, help="folder of audio files + references "
                    "(e.g. the dev set)")
    _model_options(ev)
    ev.add_argument("--json", help="write every figure (per clip, means, report) to this file")
    ev.add_argument("--batch", type=int, default=1, help="segments decoded together")
    _decode_options(ev)
    _sustain_option(ev)
    ev.add_argument("--max-clips", type=int, help="score only the first N clips (by name)")
    ev.set_defaults(func=cmd_eval)

    sv = sub.add_parser("serve", help="an HTTP transcription server (pip install "
                        "'pianolm[serve]')", description="Serve POST /v1/transcribe, /healthz, "
                        "/readyz and /metrics; segments of concurrent requests share decoder "
                        "batches (README, Serve).")
    _model_options(sv)
    _decoder_option(sv)
    _decode_options(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                    "127.0.0.1; 0.0.0.0 for every interface)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--batch", type=int, default=8, help="most segments per decoder batch, "
                    "across requests (default 8)")
    sv.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a short batch "
                    "waits for more requests (default 10)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests in flight at once; "
                    "more are answered 503 with Retry-After (default 64)")
    sv.add_argument("--max-body-mb", type=float, default=100.0, help="largest request body "
                    "(default 100 MB; larger: 413)")
    sv.add_argument("--max-streams", type=int, default=4, help="live streams (WS /v1/stream) "
                    "at once; more are refused with 503 (default 4)")
    sv.add_argument("--max-frame-kb", type=float, default=256.0, help="largest WebSocket "
                    "message of a stream (default 256 kB)")
    sv.add_argument("--stream-idle-s", type=float, default=10.0, help="a stream with no "
                    "message for this long is closed (default 10 s)")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning",
                                                             "info", "debug"],
                    help="uvicorn's log level (info: one access line per request)")
    sv.set_defaults(func=cmd_serve)

    co = sub.add_parser("corpus", help="transcribe a collection on Ray, resumable (pip install "
                        "'pianolm[scale]')", description="Transcribe every audio file under "
                        "IN (a folder, or a text/Parquet list of paths) into OUT, mirroring "
                        "its layout, with OUT/results.parquet (README, Corpus transcription).")
    co.add_argument("input", help="folder of audio files, or a .txt / .parquet list of paths")
    co.add_argument("-o", "--output", required=True, help="output folder")
    co.add_argument("--model", help="exported model folder (default: the shipped model)")
    co.add_argument("--backend", default="cpu", choices=["cpu", "cuda"],
                    help="cpu, or cuda (one GPU per actor)")
    _decoder_option(co)
    _sustain_option(co)
    co.add_argument("--ray-address", help="join this Ray cluster (default: start a local Ray)")
    co.add_argument("--actors", type=int, default=1, help="transcription actors (model copies)")
    co.add_argument("--batch", type=int, default=4, help="segments per decoder batch in an "
                    "actor")
    co.add_argument("--threads-per-actor", type=int, default=1)
    co.add_argument("--glob", default="**/*.{wav,flac,ogg,mp3}", help="which files of a folder")
    co.add_argument("--notes", choices=["tsv", "json"], help="also write each notes table")
    co.add_argument("--retry", action="store_true", help="re-run inputs that failed before")
    co.set_defaults(func=cmd_corpus)

    for name, (_, _, help_text) in PASS_THROUGH.items():
        # prefix_chars="+" hands every word after the command (--help included) through.
        cmd = sub.add_parser(name, prefix_chars="+", add_help=False, help=help_text)
        cmd.add_argument("rest", nargs=argparse.REMAINDER)
        cmd.set_defaults(func=cmd_pass_through)
    return parser


def _warnings_to_stderr() -> None:
    """The runtime's warnings (a truncated file, a segment at the note limit): one line each."""
    import logging

    logger = logging.getLogger("pianolm")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("pianolm: warning: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    _warnings_to_stderr()
    try:
        args = build_parser().parse_args(argv)
        func: Callable[[argparse.Namespace], None] = args.func
        func(args)
    except UserError as e:
        print(f"pianolm: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"pianolm: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `pianolm ... | head`: the reader left; exit quietly as other tools do (and keep
        # Python from complaining again when it flushes stdout at exit)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("pianolm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
