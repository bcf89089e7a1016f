"""The manifest of an exported model folder (docs/manifest.md): what the runtime needs to serve it.

An exported model is a folder: `manifest.json` plus ONNX graphs (an encoder, and per stage a
cross-KV graph and a decoder-step graph). The manifest names every file, every graph input and
output with its dtype and shape (the names and their order: runtime/graphs.py), the decoder
configs, the vocabulary layout, the precision and where the weights came from. `load_manifest`
validates all of it and raises `ManifestError` naming the file and the field; a runtime never
guesses.

Torch-free: json, hashlib, pathlib and the runtime's vocabulary, graph contract and roll
decoder only.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import vocab
from .graphs import (
    ENCODER_IO,
    ENCODER_PEDAL_IO,
    ENCODER_ROLLS_IO,
    POINTER_KEY,
    ROLL_FEATURES,
    ROLL_LAYOUT,
    ROLL_PRIOR,
    cache_length_axis,
    cross_kv_io,
    cross_names,
    kv_names,
    step_inputs,
    step_io,
)
from .rolls import PEDAL_KEYS, ROLL_KEYS, ROLL_METHODS, RollDecodeConfig
from .sustain import KEY, OFFSETS, SOUNDING

FORMAT = "pianolm-model"
# 2: the encoder graph may also output the four piano rolls, described by `encoder.rolls`.
# 3: the decoder graphs take and give their caches per layer (see graphs.step_io), the cross K
#    transposed. Folders of versions 1 and 2 (one stacked [layers, ...] cache tensor) are
#    refused with a re-export hint: their step graphs copy the whole cache every step.
# 4: optional `audio.input_peak`: the runtime scales each input file to this peak before
#    cutting it into segments (an encoder whose velocity reads absolute level was trained so);
#    optional `encoder.rolls.thresholds.velocity_curve` (runtime/rolls.py).
# 5: decoder options `cross_positions`, `look_ahead`, `time_head`, `ticks_per_frame`
#    (docs/decoder.md; absent: the authors' layout). A time-aligned step graph also takes
#    `query_ticks`; a pointer time head's cross-KV graph also gives `cross.pointer.key`.
# 6: a step graph's logits are every chunk position's, [batch, chunk, vocab] (a speculative
#    verify reads them all; runtime/speculative.py). Versions 3-5 give the last position's,
#    [batch, vocab]: they decode as before, and speculative decoding asks for a re-export.
# 7: a rolls-only model (no stages; default_decoder "rolls": an imported encoder such as
#    Kong et al.'s CRNN); optional `audio.segmenting` ("kong": 10 s windows at a 5 s hop, the
#    middle halves kept); `encoder.rolls.pedal` (three sustain-pedal rolls after the four);
#    `encoder.rolls.thresholds.method` and the pedal thresholds (runtime/rolls.py).
# 8: optional `decoder.enc_offset`: a stage reads embeddings[..., enc_offset : enc_offset +
#    enc_dim]. A model whose stages read different encoders (the authors' fine-tune one per
#    stage) has an encoder graph that runs each once and concatenates their embeddings, whose
#    widths `encoder.parts` lists. Optional `decoder.carried` ("after" | "separate") and
#    `decoder.roll_prior` (the stage's roll evidence added to its logits: the cross-KV graph
#    also gives `cross.rolls`, which the step graph takes).
FORMAT_VERSION = 8
FIRST_EVERY_POSITION_VERSION = 6
MIN_FORMAT_VERSION = 3
DECODERS = ("lm", "rolls")  # how notes are read: the stage decoders, or the encoder's rolls
# How audio is cut into the encoder's 10 s segments: "pianolm" (back to back, the last one
# end-aligned: runtime/audio.py transcription_segments) or "kong" (Kong et al.'s tool: zero
# padded, windows at a 5 s hop, each window's middle half kept: runtime/kong_rolls.py).
SEGMENTINGS = ("pianolm", "kong")
MANIFEST_FILE = "manifest.json"
MIN_OPSET = 17

PRECISIONS = ("fp32", "fp16", "int8")
# int8 graphs hold ONNX Runtime contrib ops (export/precision.py _to_int8): ORT only.
INT8_IS_ORT_ONLY = ("int8 exports use ONNX Runtime's MatMulNBits (8-bit weight blocks), "
                    "which TensorRT cannot parse")
DTYPES = ("float32", "float16", "int64", "int32", "bool")
# Stage lists the decode loop serves (runtime/decode.py), in decode order; () is a rolls-only
# model, whose notes come from its encoder's rolls alone.
STAGE_SETS = (vocab.STAGES, ("flat",), ())

_DECODER_INT_FIELDS = ("n_layers", "d_model", "n_heads", "enc_dim", "vocab_size", "max_seq_len",
                       "audio_pe_dim", "max_frames")
_DECODER_FLOAT_FIELDS = ("rope_base", "norm_eps")
# format 5, optional: name -> (allowed values, default: the authors' layout)
_DECODER_OPTIONS: dict[str, tuple[tuple[Any, ...], Any]] = {
    "cross_positions": (("token", "time"), "token"), "look_ahead": ((False, True), False),
    "time_head": (("lm", "pointer"), "lm"),
    "carried": (("after", "separate"), "after"),  # format 8
    "roll_prior": (("none", "onset", "velocity", "offset"), "none")}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """A model folder the runtime cannot serve; the message names the file and the field."""


# ---------------------------------------------------------------------------------------------
# The schema, as dataclasses


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. shape: ints for fixed axes, names for dynamic ones."""

    name: str
    dtype: str  # one of DTYPES
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX file of the folder."""

    file: str  # a file name inside the folder
    precision: str  # the graph's own precision (an fp16 model may keep its encoder in fp32)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    bytes: int  # size of `file` plus its external data
    sha256: str  # of `file`
    external_data: str | None = None  # the weights file beside it, for graphs over 2 GB

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "external_data": self.external_data,
                "precision": self.precision, "bytes": self.bytes, "sha256": self.sha256,
                "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}


@dataclass(frozen=True)
class DecoderSpec:
    """A stage decoder's shape (the same fields as pianolm.export.decoder.DecoderConfig)."""

    n_layers: int
    d_model: int
    n_heads: int
    enc_dim: int
    vocab_size: int
    max_seq_len: int  # positions must stay below this (the RoPE table's size)
    audio_pe_dim: int
    max_frames: int  # frames per segment must not exceed this
    rope_base: float
    norm_eps: float
    cross_positions: str = "token"  # "token" (the authors') | "time" (docs/decoder.md)
    look_ahead: bool = False
    time_head: str = "lm"  # "lm" | "pointer"
    ticks_per_frame: int = 2  # 10 ms ticks per encoder frame
    enc_offset: int = 0  # the stage reads embeddings[..., enc_offset : enc_offset + enc_dim]
    # offset stage: carried notes after the segment's own notes, in one sequence ("after",
    # pianolm's), or in a sequence of their own ("separate", the authors'; runtime/decode.py)
    carried: str = "after"
    # the stage whose roll evidence enters its logits ("none": no roll prior; docs/decoder.md)
    roll_prior: str = "none"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def time_aligned(self) -> bool:
        """The step graph takes `query_ticks` (backend.RowPositions.advance_ticks)."""
        return self.cross_positions == "time"

    @property
    def pointer(self) -> bool:
        return self.time_head == "pointer"

    @property
    def step_inputs(self) -> tuple[str, ...]:
        return step_inputs(self.time_aligned)

    @property
    def past_names(self) -> tuple[str, ...]:
        return kv_names("past_key_values", self.n_layers)

    @property
    def present_names(self) -> tuple[str, ...]:
        return kv_names("present", self.n_layers)

    @property
    def has_roll_prior(self) -> bool:
        return self.roll_prior != "none"

    @property
    def cross_names(self) -> tuple[str, ...]:
        return cross_names(self.n_layers, self.pointer, self.has_roll_prior)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StageSpec:
    name: str  # onset | velocity | offset | flat
    task_token: int
    decoder: DecoderSpec
    cross_kv: GraphSpec
    step: GraphSpec

    @property
    def every_position(self) -> bool:
        """The step graph gives logits after every chunk position (format 6), not only the
        last."""
        return len(self.step.output("logits").shape) == 3

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "task_token": self.task_token,
                "decoder": self.decoder.to_dict(), "cross_kv": self.cross_kv.to_dict(),
                "step": self.step.to_dict()}


@dataclass(frozen=True)
class RollsSpec:
    """The encoder graph's piano rolls and how to turn them into notes (runtime/rolls.py).

    Outputs `onset`, `offset`, `frame`, `velocity` (ROLL_KEYS order), each float32
    [batch, frames, 88] in 0..1 on the embeddings' frame grid, in ROLL_LAYOUT (written into the
    manifest so a reader needs no code to interpret them).
    """

    thresholds: RollDecodeConfig
    tuned: bool  # False: runtime/rolls.py's defaults, never tuned for this encoder
    thresholds_from: str  # where the thresholds came from, for the reader
    # the graph also outputs PEDAL_KEYS, each float32 [batch, frames, 1] (format 7)
    pedal: bool = False
    # what the notes read from these rolls take as an offset (runtime/sustain.py OFFSETS):
    # "sounding" (held by the pedal; what the model was trained on) or "key" (the key release)
    offsets: str = SOUNDING

    @property
    def outputs(self) -> tuple[str, ...]:
        return (*ROLL_KEYS, *(PEDAL_KEYS if self.pedal else ()))

    def to_dict(self) -> dict[str, Any]:
        return {"outputs": list(self.outputs), **ROLL_LAYOUT,
                "thresholds": self.thresholds.to_dict(), "tuned": self.tuned,
                "thresholds_from": self.thresholds_from,
                # the default is left out, as audio.segmenting's: folders written before the
                # field stay byte for byte what they were, readable by runtimes of their format
                **({"offsets": self.offsets} if self.offsets != SOUNDING else {})}


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    embed_dim: int
    frames_per_second: float
    frames_per_segment: int
    config: dict[str, Any]  # the encoder's config, front-end parameters included (informative)
    graph: GraphSpec
    rolls: RollsSpec | None = None  # None: the graph outputs embeddings only (format 1)
    # The widths of the encoders whose embeddings the graph concatenates, in order (format 8;
    # export/stage_encoders.py); () is one encoder. A stage reads exactly one part.
    parts: tuple[int, ...] = ()

    @property
    def part_slices(self) -> tuple[tuple[int, int], ...]:
        """(offset, width) of each part: what a stage's (enc_offset, enc_dim) may be."""
        widths = self.parts or (self.embed_dim,)
        return tuple((sum(widths[:i]), w) for i, w in enumerate(widths))

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "embed_dim": self.embed_dim,
               "frames_per_second": self.frames_per_second,
               "frames_per_segment": self.frames_per_segment, "config": self.config,
               "graph": self.graph.to_dict()}
        if self.rolls is not None:
            out["rolls"] = self.rolls.to_dict()
        if self.parts:
            out["parts"] = list(self.parts)
        return out


@dataclass(frozen=True)
class SourceSpec:
    """Where the weights came from: a checkpoint (with the sha256 of its weights file) or a
    random initialisation (cost benchmarks, tests)."""

    checkpoint: str | None = None
    sha256: str | None = None
    random_init: bool = False
    seed: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Manifest:
    precision: str  # the model's precision: fp32 | fp16 | int8 (see GraphSpec.precision)
    opset: int
    sample_rate: int
    segment_samples: int
    encoder: EncoderSpec
    stages: tuple[StageSpec, ...]
    source: SourceSpec
    versions: dict[str, str]  # package versions that wrote the folder
    vocab: dict[str, int] = field(default_factory=vocab.as_dict)
    format_version: int = FORMAT_VERSION
    folder: Path | None = None  # set by load_manifest; not written
    # How `pianolm transcribe` turns audio into notes unless told: "lm" (the stage decoders)
    # or "rolls" (the encoder's own rolls, runtime/rolls.py). Optional, default "lm".
    default_decoder: str = "lm"
    # The peak each input file is scaled to before segmenting (runtime/audio.py
    # normalise_peak); None: audio as it is. Optional (format 4).
    input_peak: float | None = None
    segmenting: str = "pianolm"  # one of SEGMENTINGS (format 7)

    @property
    def rolls_only(self) -> bool:
        """No LM stages: the notes come from the encoder's rolls alone."""
        return not self.stages

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"stage {name!r} not in this model's stages {list(self.stage_names)}")

    def graphs(self) -> dict[str, GraphSpec]:
        """Every graph by a short name: encoder, onset.cross_kv, onset.step, ..."""
        out = {"encoder": self.encoder.graph}
        for s in self.stages:
            out[f"{s.name}.cross_kv"] = s.cross_kv
            out[f"{s.name}.step"] = s.step
        return out

    def path(self, graph: GraphSpec) -> Path:
        if self.folder is None:
            raise ValueError("this manifest was not loaded from a folder")
        return self.folder / graph.file

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": self.format_version,
                "precision": self.precision, "opset": self.opset,
                "audio": {"sample_rate": self.sample_rate,
                          "segment_samples": self.segment_samples,
                          **({"input_peak": self.input_peak} if self.input_peak else {}),
                          **({"segmenting": self.segmenting}
                             if self.segmenting != "pianolm" else {})},
                "encoder": self.encoder.to_dict(), "vocab": dict(self.vocab),
                "stages": [s.to_dict() for s in self.stages], "source": self.source.to_dict(),
                "versions": dict(self.versions), "default_decoder": self.default_decoder}


def write_manifest(manifest: Manifest, folder: str | Path) -> Path:
    """Write `folder/manifest.json` and read it back through the validator."""
    path = Path(folder) / MANIFEST_FILE
    path.write_text(_to_json(manifest.to_dict()) + "\n")
    load_manifest(folder)
    return path


def _inline(value: Any) -> bool:
    """Short lists of scalars and tensor specs go on one line: the file stays readable."""
    scalar = (str, int, float, bool, type(None))
    if isinstance(value, list):
        ok = all(isinstance(v, scalar) for v in value)
    elif isinstance(value, dict):
        ok = all(isinstance(v, scalar) or (isinstance(v, list) and _inline(v))
                 for v in value.values())
    else:
        return True
    return ok and len(json.dumps(value)) <= 96


def _to_json(value: Any, level: int = 0) -> str:
    if _inline(value) or not value:
        return json.dumps(value)
    pad, end = "  " * (level + 1), "  " * level
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(k)}: {_to_json(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + end + "}"
    return "[\n" + ",\n".join(pad + _to_json(v, level + 1) for v in value) + "\n" + end + "]"


# ---------------------------------------------------------------------------------------------
# Reading and validating


class _Fields:
    """Typed access to a JSON object; every error names the manifest file and the field path."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, message: str) -> ManifestError:
        return ManifestError(f"{self.path}: field '{where}' {message}")

    def get(self, obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str,
            optional: bool = False) -> Any:
        at = f"{where}.{key}" if where else key
        if key not in obj:
            if optional:
                return None
            raise ManifestError(f"{self.path}: missing field '{at}'")
        value = obj[key]
        if value is None and optional:
            return None
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python: keep "opset": true and "random_init": 1 apart
        is_bool = isinstance(value, bool)
        if not isinstance(value, kinds) or (is_bool and bool not in kinds):
            names = "/".join(k.__name__ for k in kinds)
            raise self.fail(at, f"must be {names}, got {value!r}")
        return value

    def positive(self, obj: dict[str, Any], key: str, where: str) -> int:
        value = self.get(obj, key, int, where)
        if value <= 0:
            raise self.fail(f"{where}.{key}" if where else key, f"must be > 0, got {value}")
        return value

    def only(self, obj: dict[str, Any], keys: set[str], where: str) -> None:
        unknown = sorted(set(obj) - keys)
        if unknown:
            raise ManifestError(f"{self.path}: unknown field(s) {unknown} in "
                                f"'{where or '(top level)'}'")


def _tensor(f: _Fields, raw: Any, where: str) -> TensorSpec:
    if not isinstance(raw, dict):
        raise f.fail(where, f"must be an object, got {raw!r}")
    f.only(raw, {"name", "dtype", "shape"}, where)
    name = f.get(raw, "name", str, where)
    dtype = f.get(raw, "dtype", str, where)
    if dtype not in DTYPES:
        raise f.fail(f"{where}.dtype", f"is {dtype!r}; known dtypes: {list(DTYPES)}")
    shape = f.get(raw, "shape", list, where)
    for i, d in enumerate(shape):
        ok = (isinstance(d, int) and not isinstance(d, bool) and d >= 0) or (
            isinstance(d, str) and d != "")
        if not ok:
            raise f.fail(f"{where}.shape[{i}]", f"must be a size >= 0 or an axis name, got {d!r}")
    return TensorSpec(name, dtype, tuple(shape))


def _graph(f: _Fields, raw: dict[str, Any], where: str,
           io: tuple[tuple[str, ...], tuple[str, ...]], folder: Path, io_note: str = ""
           ) -> GraphSpec:
    f.only(raw, {"file", "external_data", "precision", "bytes", "sha256", "inputs", "outputs"},
           where)
    files = []
    for key in ("file", "external_data"):
        name = f.get(raw, key, str, where, optional=key == "external_data")
        if name is None:
            files.append(None)
            continue
        if Path(name).name != name or name in ("", ".", ".."):
            raise f.fail(f"{where}.{key}", f"must be a file name inside the folder, got {name!r}")
        # a missing file is reported when its graph is opened (check_graph), so a decoder
        # that never runs it (rolls: the LM graphs) is not blocked by it
        files.append(name)
    precision = f.get(raw, "precision", str, where)
    if precision not in PRECISIONS:
        raise f.fail(f"{where}.precision", f"is {precision!r}; known: {list(PRECISIONS)}")
    size = f.get(raw, "bytes", int, where)
    sha = f.get(raw, "sha256", str, where)
    if not _SHA256.match(sha):
        raise f.fail(f"{where}.sha256", f"must be 64 lowercase hex digits, got {sha!r}")
    tensors = []
    for key, names in zip(("inputs", "outputs"), io):
        items = f.get(raw, key, list, where)
        specs = tuple(_tensor(f, t, f"{where}.{key}[{i}]") for i, t in enumerate(items))
        if tuple(t.name for t in specs) != names:
            raise f.fail(f"{where}.{key}", f"names {[t.name for t in specs]}; format version "
                         f"{FORMAT_VERSION} requires {list(names)}{io_note}")
        tensors.append(specs)
    return GraphSpec(files[0], precision, tensors[0], tensors[1], size, sha, files[1])


def _expect_shape(f: _Fields, graph: GraphSpec, where: str, fixed: dict[str, dict[int, int]]
                  ) -> None:
    """Check the fixed axes of named tensors (e.g. a cache's axis 1 = n_heads)."""
    for t in graph.inputs + graph.outputs:
        for axis, size in fixed.get(t.name, {}).items():
            kind = "inputs" if t in graph.inputs else "outputs"
            if len(t.shape) <= axis or t.shape[axis] != size:
                raise f.fail(f"{where}.{kind}.{t.name}.shape",
                             f"is {list(t.shape)}; axis {axis} must be {size} (from the config)")


def _decoder(f: _Fields, raw: Any, where: str) -> DecoderSpec:
    if not isinstance(raw, dict):
        raise f.fail(where, f"must be an object, got {raw!r}")
    f.only(raw, {*_DECODER_INT_FIELDS, *_DECODER_FLOAT_FIELDS, *_DECODER_OPTIONS,
                 "ticks_per_frame", "enc_offset"}, where)
    ints = {k: f.positive(raw, k, where) for k in _DECODER_INT_FIELDS}
    floats = {k: float(f.get(raw, k, (int, float), where)) for k in _DECODER_FLOAT_FIELDS}
    options = {}
    for key, (allowed, default) in _DECODER_OPTIONS.items():
        value = f.get(raw, key, type(default), where, optional=True)
        if value is not None and value not in allowed:
            raise f.fail(f"{where}.{key}", f"is {value!r}; known: {list(allowed)}")
        options[key] = default if value is None else value
    if "ticks_per_frame" in raw:
        options["ticks_per_frame"] = f.positive(raw, "ticks_per_frame", where)
    if "enc_offset" in raw:
        options["enc_offset"] = f.get(raw, "enc_offset", int, where)
        if options["enc_offset"] < 0:
            raise f.fail(f"{where}.enc_offset", f"must be >= 0, got {options['enc_offset']}")
    spec = DecoderSpec(**ints, **floats, **options)
    if spec.has_roll_prior and not spec.time_aligned or (
            spec.roll_prior in ("onset", "offset") and not spec.pointer):
        raise f.fail(f"{where}.roll_prior", "needs cross_positions 'time' (and for the onset "
                     "and offset stages a pointer time_head)")
    if (spec.look_ahead or spec.pointer) and not spec.time_aligned:
        raise f.fail(f"{where}.cross_positions", "must be 'time' for look_ahead or a pointer "
                     "time_head")
    if spec.d_model % spec.n_heads:
        raise f.fail(f"{where}.d_model", f"{spec.d_model} is not a multiple of n_heads "
                     f"{spec.n_heads}")
    if spec.vocab_size != vocab.VOCAB_SIZE:
        raise f.fail(f"{where}.vocab_size", f"is {spec.vocab_size}; this runtime's vocabulary "
                     f"has {vocab.VOCAB_SIZE} tokens")
    return spec


def _stage(f: _Fields, raw: Any, where: str, folder: Path, parts: tuple[tuple[int, int], ...],
           frames: int, fps: float, version: int) -> StageSpec:
    if not isinstance(raw, dict):
        raise f.fail(where, f"must be an object, got {raw!r}")
    f.only(raw, {"name", "task_token", "decoder", "cross_kv", "step"}, where)
    name = f.get(raw, "name", str, where)
    if name not in vocab.TASK_TOKEN:
        raise f.fail(f"{where}.name", f"is {name!r}; known stages: {list(vocab.TASK_TOKEN)}")
    task = f.get(raw, "task_token", int, where)
    if task != vocab.TASK_TOKEN[name]:
        raise f.fail(f"{where}.task_token", f"is {task}; stage {name!r} uses "
                     f"{vocab.TASK_TOKEN[name]}")
    dec = _decoder(f, f.get(raw, "decoder", dict, where), f"{where}.decoder")
    if (dec.enc_offset, dec.enc_dim) not in parts:
        raise f.fail(f"{where}.decoder.enc_dim", f"is {dec.enc_dim} at offset {dec.enc_offset}; "
                     f"the encoder gives {' or '.join(f'{w} at {o}' for o, w in parts)}")
    if dec.max_frames < frames:
        raise f.fail(f"{where}.decoder.max_frames", f"is {dec.max_frames} < the encoder's "
                     f"{frames} frames per segment")
    if dec.time_aligned and abs(dec.ticks_per_frame * fps - vocab.TICKS_PER_SECOND) > 1e-6:
        raise f.fail(f"{where}.decoder.ticks_per_frame", f"is {dec.ticks_per_frame}; the "
                     f"encoder's {fps:g} frames/s need {vocab.TICKS_PER_SECOND / fps:g}")
    cross = _graph(f, f.get(raw, "cross_kv", dict, where), f"{where}.cross_kv",
                   cross_kv_io(dec.n_layers, dec.pointer, dec.has_roll_prior), folder)
    step = _graph(f, f.get(raw, "step", dict, where), f"{where}.step",
                  step_io(dec.n_layers, dec.time_aligned, dec.pointer, dec.has_roll_prior),
                  folder)
    fixed = {name: {1: 1 if name == POINTER_KEY else dec.n_heads,
                    2 if cache_length_axis(name) == 3 else 3: dec.head_dim}
             for name in dec.past_names + dec.present_names + dec.cross_names
             if name != ROLL_PRIOR}
    if dec.has_roll_prior:
        fixed[ROLL_PRIOR] = {1: 1, 2: ROLL_FEATURES}
    whole = sum(w for _, w in parts)  # every stage's cross-KV graph takes all the parts
    _expect_shape(f, cross, f"{where}.cross_kv", {"embeddings": {2: whole}, **fixed})
    rank = 3 if version >= FIRST_EVERY_POSITION_VERSION else 2  # [batch, (chunk,) vocab]
    if len(step.output("logits").shape) != rank:
        raise f.fail(f"{where}.step.outputs.logits.shape", f"is "
                     f"{list(step.output('logits').shape)}; format version {version} step graphs "
                     f"give {['[batch, vocab]', '[batch, chunk, vocab]'][rank - 2]}")
    _expect_shape(f, step, f"{where}.step", {**fixed, "logits": {rank - 1: dec.vocab_size}})
    return StageSpec(name, task, dec, cross, step)


def _rolls(f: _Fields, enc: dict[str, Any]) -> RollsSpec | None:
    """`encoder.rolls` (optional): the layout must be the one runtime/rolls.py decodes;
    thresholds are RollDecodeConfig fields, each of its type."""
    raw = f.get(enc, "rolls", dict, "encoder", optional=True)
    if raw is None:
        return None
    where = "encoder.rolls"
    f.only(raw, {"outputs", "min_pitch", "num_pitches", "velocity_scale", "thresholds", "tuned",
                 "thresholds_from", "offsets"}, where)
    outputs = f.get(raw, "outputs", list, where)
    with_pedal = [*ROLL_KEYS, *PEDAL_KEYS]
    # absent in folders written before it: their models were all trained on sounding offsets
    offsets = f.get(raw, "offsets", str, where, optional=True)
    offsets = SOUNDING if offsets is None else offsets
    if offsets not in OFFSETS:
        raise f.fail(f"{where}.offsets", f"is {offsets!r}; known: {list(OFFSETS)}")
    if offsets == KEY and outputs != with_pedal:
        raise f.fail(f"{where}.offsets", "is 'key', but the encoder graph has no pedal outputs "
                     "(key releases cannot be turned into sounding notes without the pedal)")
    if outputs not in (list(ROLL_KEYS), with_pedal):
        raise f.fail(f"{where}.outputs", f"is {outputs}; this runtime decodes "
                     f"{list(ROLL_KEYS)} or {with_pedal}")
    for key, want in ROLL_LAYOUT.items():
        got = f.get(raw, key, int, where)
        if got != want:
            raise f.fail(f"{where}.{key}", f"is {got}; this runtime decodes rolls with {want}")
    thresholds = f.get(raw, "thresholds", dict, where)
    # each field's JSON type follows its default's: bool, int, or a number (null only where
    # the default is None); a missing field takes the default
    defaults = RollDecodeConfig().to_dict()
    f.only(thresholds, set(defaults), f"{where}.thresholds")
    values = {}
    for key in set(thresholds) & set(defaults):
        d = defaults[key]
        if isinstance(d, list):  # velocity_curve: a list of numbers
            items = f.get(thresholds, key, list, f"{where}.thresholds")
            if not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in items):
                raise f.fail(f"{where}.thresholds.{key}", f"must be a list of numbers, got {items}")
            values[key] = items
            continue
        kind = (str if isinstance(d, str) else bool if isinstance(d, bool)
                else int if isinstance(d, int) else (int, float))
        values[key] = f.get(thresholds, key, kind, f"{where}.thresholds", optional=d is None)
    if values.get("method", "pianolm") not in ROLL_METHODS:
        raise f.fail(f"{where}.thresholds.method", f"is {values['method']!r}; known: "
                     f"{list(ROLL_METHODS)}")
    return RollsSpec(RollDecodeConfig.from_dict(values), f.get(raw, "tuned", bool, where),
                     f.get(raw, "thresholds_from", str, where), pedal=outputs == with_pedal,
                     offsets=offsets)


def load_manifest(folder: str | Path) -> Manifest:
    """Read and validate `folder/manifest.json` (or the manifest file itself): one reader per
    section, each naming the field it rejects."""
    folder, path, raw = _read_json(Path(folder))
    f = _Fields(path)
    f.only(raw, {"format", "format_version", "precision", "opset", "audio", "encoder", "vocab",
                 "stages", "source", "versions", "default_decoder"}, "")
    version = _header(f, raw)
    sample_rate, segment_samples, input_peak, segmenting = _audio(f, f.get(raw, "audio", dict,
                                                                           ""))
    vocab_raw = _vocab(f, f.get(raw, "vocab", dict, ""))
    encoder = _encoder(f, f.get(raw, "encoder", dict, ""), folder)
    stages = _stages(f, f.get(raw, "stages", list, ""), folder, encoder, version)
    source = _source(f, f.get(raw, "source", dict, ""))
    versions = _versions(f, f.get(raw, "versions", dict, ""))
    default_decoder = _default_decoder(f, raw, encoder, stages)
    return Manifest(f.get(raw, "precision", str, ""), f.get(raw, "opset", int, ""), sample_rate,
                    segment_samples, encoder, stages, source, versions, vocab_raw, version,
                    folder, default_decoder, input_peak, segmenting)


def _read_json(folder: Path) -> tuple[Path, Path, dict[str, Any]]:
    """(model folder, manifest path, its JSON object)."""
    if folder.name == MANIFEST_FILE and folder.is_file():
        folder = folder.parent
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise ManifestError(f"{folder}: no such model folder (expected {MANIFEST_FILE} inside)")
    if not path.is_file():
        raise ManifestError(f"{path}: missing (not an exported pianolm model folder?)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: not readable JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: top level must be an object")
    return folder, path, raw


def _header(f: _Fields, raw: dict[str, Any]) -> int:
    """format, format_version (returned), precision, opset."""
    fmt = f.get(raw, "format", str, "")
    if fmt != FORMAT:
        raise f.fail("format", f"is {fmt!r}, expected {FORMAT!r}")
    version = f.get(raw, "format_version", int, "")
    if version > FORMAT_VERSION:
        raise f.fail("format_version", f"is {version}; this runtime reads versions "
                     f"{MIN_FORMAT_VERSION}..{FORMAT_VERSION}: upgrade pianolm")
    if version < MIN_FORMAT_VERSION:
        raise f.fail("format_version", f"is {version}: its decoder graphs take one stacked KV "
                     f"cache, this runtime serves per-layer caches (version "
                     f"{MIN_FORMAT_VERSION}): re-export the model with `pianolm export`")
    precision = f.get(raw, "precision", str, "")
    if precision not in PRECISIONS:
        raise f.fail("precision", f"is {precision!r}; known: {list(PRECISIONS)}")
    opset = f.get(raw, "opset", int, "")
    if opset < MIN_OPSET:
        raise f.fail("opset", f"is {opset}; at least {MIN_OPSET} is required")
    return version


def _audio(f: _Fields, audio: dict[str, Any]) -> tuple[int, int, float | None, str]:
    """(sample_rate, segment_samples, input_peak, segmenting)."""
    f.only(audio, {"sample_rate", "segment_samples", "input_peak", "segmenting"}, "audio")
    sample_rate = f.positive(audio, "sample_rate", "audio")
    segment_samples = f.positive(audio, "segment_samples", "audio")
    input_peak = f.get(audio, "input_peak", (int, float), "audio", optional=True)
    if input_peak is not None and not 0 < input_peak <= 1:
        raise f.fail("audio.input_peak", f"must be in (0, 1], got {input_peak}")
    segmenting = f.get(audio, "segmenting", str, "audio", optional=True) or "pianolm"
    if segmenting not in SEGMENTINGS:
        raise f.fail("audio.segmenting", f"is {segmenting!r}; known: {list(SEGMENTINGS)}")
    return (sample_rate, segment_samples, None if input_peak is None else float(input_peak),
            segmenting)


def _vocab(f: _Fields, vocab_raw: dict[str, Any]) -> dict[str, Any]:
    """Must be this runtime's vocabulary, entry for entry."""
    expected = vocab.as_dict()
    for key in sorted(set(vocab_raw) | set(expected)):
        if vocab_raw.get(key) != expected.get(key):
            raise f.fail(f"vocab.{key}", f"is {vocab_raw.get(key)!r}; this runtime's vocabulary "
                         f"(runtime/vocab.py) has {expected.get(key)!r}")
    return dict(vocab_raw)


def _encoder(f: _Fields, enc: dict[str, Any], folder: Path) -> EncoderSpec:
    f.only(enc, {"name", "embed_dim", "frames_per_second", "frames_per_segment", "config",
                 "graph", "rolls", "parts"}, "encoder")
    embed_dim = f.positive(enc, "embed_dim", "encoder")
    parts = tuple(f.get(enc, "parts", list, "encoder", optional=True) or ())
    if parts and (not all(isinstance(w, int) and not isinstance(w, bool) and w > 0
                          for w in parts) or sum(parts) != embed_dim):
        raise f.fail("encoder.parts", f"is {list(parts)}; positive widths summing to "
                     f"embed_dim {embed_dim}")
    frames = f.positive(enc, "frames_per_segment", "encoder")
    fps = f.get(enc, "frames_per_second", (int, float), "encoder")
    if fps <= 0:
        raise f.fail("encoder.frames_per_second", f"must be > 0, got {fps}")
    rolls = _rolls(f, enc)
    io, note = ((ENCODER_IO, " (without encoder.rolls)") if rolls is None else
                (ENCODER_PEDAL_IO, " (with encoder.rolls and its pedal)") if rolls.pedal else
                (ENCODER_ROLLS_IO, " (with encoder.rolls)"))
    graph = _graph(f, f.get(enc, "graph", dict, "encoder"), "encoder.graph", io, folder, note)
    roll_axes = {2: ROLL_LAYOUT["num_pitches"]} if rolls else {}
    pedal_axes = {2: 1} if rolls and rolls.pedal else {}
    _expect_shape(f, graph, "encoder.graph", {"embeddings": {2: embed_dim},
                                              **{k: roll_axes for k in ROLL_KEYS},
                                              **{k: pedal_axes for k in PEDAL_KEYS}})
    return EncoderSpec(f.get(enc, "name", str, "encoder"), embed_dim, float(fps), frames,
                       f.get(enc, "config", dict, "encoder"), graph, rolls, parts)


def _stages(f: _Fields, stages_raw: list[Any], folder: Path, encoder: EncoderSpec,
            version: int) -> tuple[StageSpec, ...]:
    stages = tuple(_stage(f, s, f"stages[{i}]", folder, encoder.part_slices,
                          encoder.frames_per_segment, encoder.frames_per_second, version)
                   for i, s in enumerate(stages_raw))
    names = tuple(s.name for s in stages)
    if names not in STAGE_SETS:
        raise f.fail("stages", f"are {list(names)}; a model has exactly "
                     f"{' or '.join(str(list(s)) for s in STAGE_SETS)}, in that order")
    return stages


def _source(f: _Fields, src: dict[str, Any]) -> SourceSpec:
    f.only(src, {"checkpoint", "sha256", "random_init", "seed", "metadata"}, "source")
    sha = f.get(src, "sha256", str, "source", optional=True)
    if sha is not None and not _SHA256.match(sha):
        raise f.fail("source.sha256", f"must be 64 lowercase hex digits, got {sha!r}")
    source = SourceSpec(f.get(src, "checkpoint", str, "source", optional=True), sha,
                        f.get(src, "random_init", bool, "source"),
                        f.get(src, "seed", int, "source", optional=True),
                        f.get(src, "metadata", dict, "source", optional=True) or {})
    if not source.random_init and source.sha256 is None:
        raise f.fail("source.sha256", "is required unless source.random_init is true")
    return source


def _versions(f: _Fields, versions: dict[str, Any]) -> dict[str, str]:
    for key, value in versions.items():
        if not isinstance(value, str):
            raise f.fail(f"versions.{key}", f"must be str, got {value!r}")
    return dict(versions)


def _default_decoder(f: _Fields, raw: dict[str, Any], encoder: EncoderSpec,
                     stages: tuple[StageSpec, ...]) -> str:
    default_decoder = f.get(raw, "default_decoder", str, "", optional=True) or "lm"
    if default_decoder not in DECODERS:
        raise f.fail("default_decoder", f"is {default_decoder!r}; known: {list(DECODERS)}")
    if default_decoder == "rolls" and encoder.rolls is None:
        raise f.fail("default_decoder", "is 'rolls', but the encoder graph has no roll outputs")
    if not stages and default_decoder != "rolls":
        raise f.fail("default_decoder", "must be 'rolls' for a model without stages (its "
                     "notes come from the encoder's rolls alone)")
    return default_decoder


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_sha256(folder: str | Path) -> str:
    """A model folder's identity: the sha256 of its manifest, which records every graph's."""
    return file_sha256(Path(folder) / MANIFEST_FILE)


# Hashing is cheap next to loading a graph, so every graph up to this size is hashed on every
# load; bigger ones get the size check, and the hash on request.
HASH_ON_LOAD_BYTES = 256 << 20


def check_graph(manifest: Manifest, name: str, hash_: bool | None = None) -> None:
    """One graph file against the manifest, before ONNX Runtime sees it: present, the size it
    records, and (hash_=True, or None and the graph is small enough) its sha256. A corrupted
    or truncated file otherwise loads and gives wrong notes silently."""
    graph = manifest.graphs()[name]
    path = manifest.path(graph)
    files = [path] + ([path.parent / graph.external_data] if graph.external_data else [])
    for p in files:
        if not p.is_file():
            raise ManifestError(f"{p}: missing (graph {name} of the model)")
    size = sum(p.stat().st_size for p in files)
    where = f"{MANIFEST_FILE} graph {name}"
    if size != graph.bytes:
        raise ManifestError(f"{path}: {size} bytes, {where} says {graph.bytes} (file changed "
                            "or corrupt)")
    if hash_ or (hash_ is None and graph.bytes <= HASH_ON_LOAD_BYTES):
        if file_sha256(path) != graph.sha256:
            raise ManifestError(f"{path}: sha256 differs from {where} (file changed or "
                                f"corrupt)")


def verify_files(manifest: Manifest) -> None:
    """Check every graph file's size and sha256 against the manifest (reads every byte)."""
    for name in manifest.graphs():
        check_graph(manifest, name, hash_=True)
