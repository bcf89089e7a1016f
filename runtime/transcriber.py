"""Audio files in, notes out: `Transcriber` streams segments through the decode loop.

    t = Transcriber()                          # the shipped default model, ONNX Runtime CPU
    result = t.transcribe("song.wav")          # or t.transcribe((samples, sample_rate))
    result.write_midi("song.mid")
    for result in t.transcribe_many(paths):    # files share batches: throughput mode
        ...
    print(t.report.format())

Segments of every input form one stream, cut into batches of `batch` rows, so several short
files fill a batch and a long file never holds more than one batch of audio, embeddings or
caches in memory. A row whose previous segment sits in the same batch takes its carried notes
from it (runtime/decode.py); otherwise they come from the batch before. A file's notes are
stitched as its segments are decoded (decode.FileNotes: what a long file keeps is its notes)
and returned as soon as its last segment is, in input order.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .audio import (
    SAMPLE_RATE,
    SEGMENT_SAMPLES,
    AudioError,
    normalise_peak,
    num_segments,
    prepare_audio,
    probe_audio,
    segments_from_array,
    stream_segments,
    tail_start,
    transcription_segments,
)
from .backend import Backend
from .decode import (
    DEFAULT_MAX_NOTES,
    FileNotes,
    OpenNote,
    RowSpec,
    SegmentTokens,
    concurrent_by_default,
    decode_batch,
    speculation_for,
)
from .kong_rolls import kong_kept_frames, kong_notes, kong_pedals, kong_window_count, kong_windows
from .manifest import DECODERS, Manifest, ManifestError, RollsSpec, load_manifest
from .midi import write_midi, write_notes_json, write_notes_tsv
from .notes import Note, Pedal
from .report import Report, Tally, TimedBackend, Timings
from .rolls import PEDAL_KEYS, ROLL_KEYS, RollStream, kept_frames
from .sustain import SOUNDING, check_sustain, convert_offsets, offsets_of

Source = str | os.PathLike | tuple[np.ndarray, int]
BACKENDS = ("cpu", "cuda", "tensorrt")


class ModelNotFoundError(ManifestError):
    """No model folder given and none shipped."""


def default_model_dir() -> Path:
    """engines/default/ of the installed package; a one-line error when nothing is shipped."""
    from pianolm.engines import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "manifest.json").is_file():
        raise ModelNotFoundError(f"no default model is shipped in {DEFAULT_MODEL_DIR} yet: pass "
                                 "--model DIR, a folder made by `pianolm export`")
    return DEFAULT_MODEL_DIR


def open_backend(name: str, model_dir: str | os.PathLike, threads: int | None = None,
                 decoder: str | None = None) -> Backend:
    """The runtime backend called `name` over an exported model folder. decoder="rolls" opens
    only the encoder graph on the CPU backend (the LM graphs are never run)."""
    if name == "cpu":
        from .ort_backend import OrtBackend

        return OrtBackend(model_dir, threads=threads,
                          graphs=("encoder",) if decoder == "rolls" else None)
    if name == "cuda":
        from .ort_iobinding import OrtIoBindingBackend

        return OrtIoBindingBackend(model_dir, device="cuda", threads=threads)
    if name == "tensorrt":
        from .trt_backend import TensorRTBackend

        return TensorRTBackend(model_dir)
    raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


@dataclass
class Transcription:
    """One input's notes."""

    source: str
    notes: list[Note]
    duration_s: float
    # sustain-pedal intervals, for a model whose encoder has a pedal model (else empty)
    pedals: list[Pedal] = field(default_factory=list)

    def write_midi(self, path: str | os.PathLike) -> None:
        write_midi(self.notes, path, pedals=self.pedals)

    def write_notes(self, path: str | os.PathLike, fmt: str = "tsv") -> None:
        write = write_notes_json if fmt == "json" else write_notes_tsv
        write(self.notes, path, pedals=self.pedals)


@dataclass
class Failure:
    """An input that could not be transcribed (transcribe_many(..., keep_going=True))."""

    source: str
    error: str  # one line, naming the input


@dataclass
class InputState:
    """One source being streamed: its segments so far and the notes its last one left open."""

    name: str
    num_segments: int
    duration_s: float
    n_samples: int  # at 16 kHz
    last_start: int | None  # audio.tail_start: the end-aligned last segment's first sample
    decoded: int = 0  # segments decoded so far
    notes: FileNotes | None = None  # decoder="lm": the notes stitched so far
    carry: list[OpenNote] = field(default_factory=list)
    rolls: RollStream | None = None  # decoder="rolls": peak picking so far (carried state)
    whole: FileRolls | None = None  # decoder="rolls": the rolls kept whole (Kong, pedal)
    pedals: list[Pedal] = field(default_factory=list)
    segmenting: str = "pianolm"  # the manifest's audio.segmenting
    samples_read: list[int] = field(default_factory=list)  # audio.stream_segments(lengths=)
    sustain: str | None = None  # the offsets this input asked for; None: the Transcriber's
    result: Transcription | None = None
    error: str | None = None

    def is_tail(self, index: int) -> bool:
        """Segment `index` is the end-aligned last one (decoded on its own, merged after)."""
        return self.last_start is not None and index == self.num_segments - 1


@dataclass
class FileRolls:
    """A file's rolls, kept whole until its last segment: what Kong et al.'s post-processor
    reads (a note may look 6 s ahead; runtime/kong_rolls.py), and the pedal rolls (one value a
    frame). 88 keys x 4 rolls is 1.4 kB a frame: ~140 kB per second of audio."""

    parts: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def push(self, rolls: dict[str, np.ndarray]) -> None:
        for key, roll in rolls.items():
            self.parts.setdefault(key, []).append(roll)

    def joined(self) -> dict[str, np.ndarray]:
        return {key: np.concatenate(parts) for key, parts in self.parts.items()}


# One row of a decode batch: the input, the segment's index in it, its 16 kHz samples
Row = tuple[InputState, int, np.ndarray]


def segment_align(backend: Backend) -> int:
    """Samples the end-aligned last segment's start is rounded to: a whole number of encoder
    frames and of 10 ms ticks, so its rolls and tokens line up with the other segments'."""
    manifest: Manifest | None = getattr(backend, "manifest", None)
    fps = (manifest.encoder.frames_per_second if manifest
           else getattr(backend, "frames_per_second", None))
    tick = SAMPLE_RATE // 100
    return tick if not fps else math.lcm(tick, round(SAMPLE_RATE / fps))


def input_peak_of(backend: Backend) -> float | None:
    """The peak each input file is scaled to before segmenting: the manifest's
    audio.input_peak, or a backend's own `input_peak` (the PyTorch reference, wrappers)."""
    manifest: Manifest | None = getattr(backend, "manifest", None)
    return manifest.input_peak if manifest else getattr(backend, "input_peak", None)


def _open_source(source: Source, peak: float | None, align: int, segmenting: str = "pianolm"
                 ) -> tuple[InputState, Iterator[np.ndarray]]:
    """peak: the manifest's input_peak (each input scaled to it), or None. The segments are
    audio.transcription_segments: the last partial one end-aligned, a short input tiled; with
    Kong's segmenting, his windows at a 5 s hop over the zero-padded audio."""
    if segmenting == "kong":
        return _open_kong(source, peak)
    if isinstance(source, tuple):
        samples, rate = source
        audio = normalise_peak(prepare_audio(samples, rate), peak)
        n = len(audio)
        return (InputState("<array>", num_segments(n), n / SAMPLE_RATE, n, tail_start(n, align)),
                transcription_segments([audio], align))
    info = probe_audio(source)
    n = info.samples_16k
    item = InputState(str(source), info.num_segments, info.duration_s, n, tail_start(n, align))
    return item, stream_segments(source, peak=peak, align=align, lengths=item.samples_read)


def _open_kong(source: Source, peak: float | None) -> tuple[InputState, Iterator[np.ndarray]]:
    """Kong et al.'s segmenting: zero-padded 10 s segments, read as his half-hop windows."""
    if isinstance(source, tuple):
        samples, rate = source
        audio = normalise_peak(prepare_audio(samples, rate), peak)
        name, n, segments = "<array>", len(audio), segments_from_array(audio)
        read: list[int] = []
    else:
        info = probe_audio(source)
        name, n, read = str(source), info.samples_16k, []
        segments = stream_segments(source, peak=peak, lengths=read)
    item = InputState(name, kong_window_count(n, SEGMENT_SAMPLES), n / SAMPLE_RATE, n, None,
                      samples_read=read, segmenting="kong")
    return item, kong_windows(segments)


class Transcriber:
    """Transcribes audio with an exported model folder (runtime/manifest.py).

    model_dir: the export folder; None = the shipped default model (engines/default/).
    backend: "cpu" (ONNX Runtime), "cuda" (ONNX Runtime CUDA, IO binding), "tensorrt", or any
        object implementing runtime/backend.py's Backend (e.g. the PyTorch reference).
    batch: segments decoded together (across files); larger = more throughput, more memory.
    concurrent: run the velocity and offset stages side by side; None = where that helps
        (runtime/decode.py concurrent_by_default: a GPU, or spare CPU cores).
    decoder: "lm" (the stage decoders) or "rolls" (the encoder's own piano rolls, decoded with
        the manifest's thresholds: runtime/rolls.py); None = the manifest's `default_decoder`.
    speculative: the LM stages verify drafts from the rolls (runtime/speculative.py): the same
        notes in fewer decoder calls; None = where that pays (decode.speculative_by_default).
    sustain: the note offsets wanted (runtime/sustain.py): "sounding" (held by the pedal) or
        "key" (the key release); SustainError where the model's notes cannot give them.
    """

    def __init__(self, model_dir: str | os.PathLike | None = None,
                 backend: str | Backend = "cpu", batch: int = 1, threads: int | None = None,
                 max_notes: int = DEFAULT_MAX_NOTES, concurrent: bool | None = None,
                 decoder: str | None = None, speculative: bool | None = None,
                 sustain: str = SOUNDING) -> None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        if isinstance(backend, str):
            folder = model_dir or default_model_dir()
            if decoder is None:  # the manifest's choice decides which graphs are opened
                decoder = load_manifest(folder).default_decoder
            self.backend_name = backend
            self.backend = open_backend(backend, folder, threads, decoder)
        else:  # a wrapper may name the backend it wraps (runtime/evaluation.py RollTap)
            self.backend_name = getattr(backend, "backend_name", type(backend).__name__)
            self.backend = backend
        manifest: Manifest | None = getattr(self.backend, "manifest", None)
        self.decoder = decoder or (manifest.default_decoder if manifest else "lm")
        if self.decoder not in DECODERS:
            raise ValueError(f"unknown decoder {self.decoder!r}: choose one of "
                             f"{', '.join(DECODERS)}")
        self.rolls: RollsSpec | None = manifest.encoder.rolls if manifest else None
        # the offset convention of the notes this decoder reads from the model
        self.offsets = offsets_of(manifest, self.decoder) if manifest else SOUNDING
        check_sustain(self.offsets, sustain)
        self.sustain = sustain
        self.input_peak = input_peak_of(self.backend)
        if self.decoder == "rolls" and self.rolls is None:
            raise ManifestError("decoder 'rolls' needs a model whose encoder graph outputs "
                                "piano rolls (manifest encoder.rolls); this one has none")
        self.segmenting = manifest.segmenting if manifest else "pianolm"
        if self.decoder == "lm" and manifest is not None and manifest.rolls_only:
            raise ManifestError("this model has no LM stages (a rolls-only model, e.g. one "
                                "made by `pianolm import`): use --decoder rolls")
        if self.decoder == "lm" and self.segmenting != "pianolm":
            raise ManifestError(f"the model cuts audio as {self.segmenting!r} "
                                "(manifest audio.segmenting), which only --decoder rolls reads")
        self.precision: str = getattr(self.backend, "precision", "fp32")
        self.batch = batch
        self.threads = threads
        self.max_notes = max_notes
        self.concurrent = (concurrent_by_default(self.backend_name, threads)
                           if concurrent is None else concurrent)
        self.speculation = (speculation_for(manifest, speculative, self.backend_name)
                            if self.decoder == "lm" else None)
        # the offset stage's layout (the authors' decoders read carried notes apart)
        self.carried = ("after" if manifest is None or "offset" not in manifest.stage_names
                        else manifest.stage("offset").decoder.carried)
        self._local = threading.local()  # each thread's latest report

    def transcribe(self, source: Source) -> Transcription:
        (result,) = self.transcribe_many([source])
        assert isinstance(result, Transcription)
        return result

    def transcribe_many(self, sources: Iterable[Source],
                        progress: Callable[[int], None] | None = None,
                        keep_going: bool = False) -> Iterator[Transcription | Failure]:
        """Yield each source's Transcription in input order; `progress(n)` after each batch
        with the number of segments it decoded. `self.report` holds this call's figures (per
        thread: concurrent calls each see their own).

        keep_going: an input that fails (unreadable, NaN samples mid-way, ...) yields a
        Failure in its place and the others go on; otherwise its AudioError is raised.
        """
        timings = Timings()
        timed = TimedBackend(self.backend, timings)
        tally = Tally()
        t0 = time.perf_counter()
        first_note: float | None = None
        order: deque[InputState] = deque()  # inputs opened, not yet handed back: input order
        for batch in self._batches(sources, order, keep_going):
            if batch:
                for item, notes in self.decode_rows(batch, timed, tally):
                    first_note = first_note if first_note is not None else (
                        time.perf_counter() - t0)
                    item.result = Transcription(item.name, notes, item.duration_s,
                                                item.pedals)
            while order and (order[0].result is not None or order[0].error is not None):
                item = order.popleft()
                self._local.report = self._report(timings, tally, t0, first_note)
                yield item.result or Failure(item.name, item.error or "")
            if progress and batch:
                progress(len(batch))
        self._local.report = self._report(timings, tally, t0, first_note)

    def open(self, source: Source, sustain: str | None = None
             ) -> tuple[InputState, Iterator[Row]]:
        """Open one source (its header is read now: AudioError if unreadable) and the rows of
        its segments in order, read lazily (a server's batcher interleaves several). sustain:
        this input's note offsets (None: the Transcriber's); SustainError before any reading."""
        if sustain is not None:
            check_sustain(self.offsets, sustain)
        align = segment_align(self.backend)
        item, segments = _open_source(source, self.input_peak, align, self.segmenting)
        item.sustain = sustain
        return item, _rows(item, segments, align)

    def decode_rows(self, batch: list[Row], timed: TimedBackend, tally: Tally | None = None
                    ) -> list[tuple[InputState, list[Note]]]:
        """Decode one batch with this transcriber's decoder; the inputs whose last segment it
        held, with their notes (counted in `tally`). A row's segment must come after its
        input's earlier ones (in an earlier batch, or earlier in this one). Inputs' state
        changes only on success."""
        tally = Tally() if tally is None else tally
        decode = self._roll_batch if self.decoder == "rolls" else self._lm_batch
        # an input's notes are final here, for transcribe_many and the server's batcher alike:
        # the one place they are given the offsets the input asked for
        finished = [(item, convert_offsets(notes, item.pedals, self.offsets,
                                           item.sustain or self.sustain))
                    for item, notes in decode(batch, timed, tally)]
        for item, notes in finished:
            tally.files += 1
            tally.audio_s += item.duration_s
            tally.notes += len(notes)
        return finished

    @property
    def report(self) -> Report | None:
        """The figures of this thread's latest transcribe_many call (None before one)."""
        return getattr(self._local, "report", None)

    def _lm_batch(self, batch: list[Row], timed: TimedBackend,
                  tally: Tally) -> list[tuple[InputState, list[Note]]]:
        """decoder="lm": the hierarchical decode loop; the inputs whose last segment this
        batch held, with their stitched notes."""
        rows = _row_specs(batch)
        audio = np.stack([seg for _, _, seg in batch])
        t_batch = time.perf_counter()
        decoded = decode_batch(timed, audio, rows, self.max_notes, self.concurrent,
                               self.speculation, tally.stages, self.carried)
        encode_s = timed.timings.encoder[-1][1]
        tally.decode_s += time.perf_counter() - t_batch - encode_s
        finished = []
        for (item, _, _), seg in zip(batch, decoded):
            item.notes = item.notes or FileNotes()
            item.notes.push(seg)
            item.carry = seg.carry_out
            item.decoded += 1
            tally.tokens += _predicted_tokens(seg)
            if item.decoded == item.num_segments:
                tail_s = None if item.last_start is None else item.last_start / SAMPLE_RATE
                finished.append((item, item.notes.finish(item.duration_s, tail_s)))
                item.notes = None
        return finished

    def _roll_batch(self, batch: list[Row], timed: TimedBackend,
                    tally: Tally) -> list[tuple[InputState, list[Note]]]:
        """decoder="rolls": one encoder run; each segment's frames go straight into its input's
        RollStream (peak picking with carried open notes, runtime/rolls.py), so no input's
        note rolls are kept beyond a few frames; an input's notes are final with its last
        segment. Kong's post-processor (thresholds.method "kong") and the pedal read a file's
        rolls whole (FileRolls)."""
        assert self.rolls is not None
        _, rolls = timed.encode_with_rolls(np.stack([seg for _, _, seg in batch]))
        assert rolls is not None
        fps = self.backend.manifest.encoder.frames_per_second
        config = self.rolls.thresholds
        whole_keys = (self.rolls.outputs if config.method == "kong" else
                      PEDAL_KEYS if self.rolls.pedal else ())
        t_dec = time.perf_counter()
        finished = []
        for r, (item, index, _) in enumerate(batch):
            if item.segmenting == "kong":
                keep = kong_kept_frames(index, item.num_segments, rolls["onset"].shape[1])
            else:
                keep = kept_frames(index, item.num_segments, fps, item.n_samples,
                                   item.last_start)
            if config.method != "kong":
                item.rolls = item.rolls or RollStream(fps, config)
                item.rolls.push({k: rolls[k][r, keep] for k in ROLL_KEYS})
            if whole_keys:
                item.whole = item.whole or FileRolls()
                item.whole.push({k: rolls[k][r, keep] for k in whole_keys})
            item.decoded += 1
            if item.decoded == item.num_segments:
                whole = item.whole.joined() if item.whole else {}
                notes = kong_notes(whole, fps, config) if item.rolls is None \
                    else item.rolls.finish()
                item.pedals = kong_pedals(whole, fps, config) if self.rolls.pedal else []
                finished.append((item, notes))
                item.rolls = item.whole = None
        tally.decode_s += time.perf_counter() - t_dec
        return finished

    def _batches(self, sources: Iterable[Source], order: deque[InputState], keep_going: bool
                 ) -> Iterator[list[Row]]:
        """Every source's segments, in order, in batches of self.batch rows; each input is
        appended to `order` when opened. An empty batch is yielded after a failure, so the
        caller hands it back in order."""
        batch: list[Row] = []
        align = segment_align(self.backend)
        for source in sources:
            item: InputState | None = None
            try:
                item, segments = _open_source(source, self.input_peak, align, self.segmenting)
                order.append(item)
                for row in _rows(item, segments, align):
                    batch.append(row)
                    if len(batch) == self.batch:
                        yield batch
                        batch = []
            except AudioError as e:
                if not keep_going:
                    raise
                if item is None:  # failed before it was opened
                    name = "<array>" if isinstance(source, tuple) else str(source)
                    item = InputState(name, 0, 0.0, 0, None)
                    order.append(item)
                item.error = str(e)
                batch = [row for row in batch if row[0] is not item]
                yield []
                continue
        if batch:
            yield batch

    def _report(self, timings: Timings, tally: Tally, t0: float, first_note: float | None
                ) -> Report:
        return Report.build(timings, tally, backend=self.backend_name,
                            precision=self.precision, batch=self.batch, threads=self.threads,
                            wall_s=time.perf_counter() - t0, time_to_first_note_s=first_note,
                            decoder=self.decoder, concurrent=self.concurrent,
                            speculative=self.speculation is not None)


def _rows(item: InputState, segments: Iterator[np.ndarray], align: int) -> Iterator[Row]:
    """An input's rows in order, read one ahead so the last segment is known as such; a file
    shorter than its header promised is corrected before its last row is handed out."""
    index, segment = 0, next(segments)
    for following in segments:
        yield item, index, segment
        index, segment = index + 1, following
    _shorter_than_its_header(item, index + 1, align)
    yield item, index, segment


def _shorter_than_its_header(item: InputState, segments: int, align: int) -> None:
    """A file that held fewer samples than its header promised (a truncated WAV) is
    transcribed as what is there: its length and segment plan are corrected before its last
    segment is decoded (audio.py has warned)."""
    if item.samples_read and item.samples_read[0] != item.n_samples:
        n = item.samples_read[0]
        item.n_samples, item.duration_s = n, n / SAMPLE_RATE
        item.num_segments = segments
        item.last_start = tail_start(n, align) if item.segmenting == "pianolm" else None


def _row_specs(batch: list[Row]) -> list[RowSpec]:
    """Where each row's carried notes come from: its predecessor row, or the batch before."""
    rows, where = [], {}
    for r, (item, index, _) in enumerate(batch):
        if item.is_tail(index):  # decoded on its own, merged by to_notes
            rows.append(RowSpec(index, None, []))
            continue
        prev = where.get((id(item), index - 1))
        rows.append(RowSpec(index, prev, [] if prev is not None else list(item.carry)))
        where[id(item), index] = r
    return rows


def _predicted_tokens(seg: SegmentTokens) -> int:
    """Tokens the decoders chose for a segment (fed known tokens not counted)."""
    t = seg.tokens
    if "flat" in t:
        return len(t["flat"])
    return len(t["onset"]) + len(t["velocity"]) // 3 + len(t["offset"]) // 3
