"""Export a TranscriptionSystem to an ONNX model folder (docs/manifest.md).

The folder holds `manifest.json` and, per part, one ONNX graph with every input and output
named (sherpa-onnx's Whisper export style):

    encoder.onnx            waveform [batch, samples] -> embeddings [batch, frames, E] and the
                            rolls onset, offset, frame, velocity [batch, frames, 88]
    {stage}_cross_kv.onnx   embeddings -> per layer i: cross.{i}.key [batch, heads, head_dim,
                            frames] (transposed), cross.{i}.value [batch, heads, frames, head_dim]
                            (+ cross.pointer.key with a pointer time head)
    {stage}_step.onnx       tokens, positions, key_mask (+ query_ticks, time-aligned),
                            past_key_values.{i}.key/value, the cross-KV outputs -> logits
                            [batch, vocab], present.{i}.key/value

(runtime/manifest.py step_io). One step graph serves prefill (chunk > 1, past 0) and steps:
there is no If/Loop, every length comes from an input shape, past length 0 works. Dynamic axes
carry fixed names (batch, samples, frames, chunk, past, past_plus_chunk), shared across inputs
(every past key and value says "past").

Top to bottom: the export wrappers, exporting one graph, fp16 / int8 conversion of an fp32
folder, `export_model`, parity measurement (ONNX Runtime vs PyTorch), and `pianolm export`.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import Tensor, nn

from pianolm.export.decoder import CROSS_POSITIONS, KV, TIME_HEADS, CrossCache, Decoder
from pianolm.export.encoders import EncoderGraph
from pianolm.export.system import SEGMENT_SAMPLES, TranscriptionSystem
from pianolm.runtime import vocab
from pianolm.runtime.manifest import (
    DECODERS,
    ENCODER_ROLLS_IO,
    MANIFEST_FILE,
    MIN_OPSET,
    PRECISIONS,
    DecoderSpec,
    EncoderSpec,
    GraphSpec,
    Manifest,
    RollsSpec,
    SourceSpec,
    StageSpec,
    TensorSpec,
    cache_length_axis,
    cache_shape,
    cross_kv_io,
    cross_names,
    file_sha256,
    kv_names,
    load_manifest,
    step_io,
    write_manifest,
)
from pianolm.runtime.ort_backend import RowPositions
from pianolm.runtime.provenance import package_versions
from pianolm.runtime.rolls import ROLL_KEYS, RollDecodeConfig

log = logging.getLogger(__name__)

OPSET = 18
# protobuf cannot serialise a message over 2 GiB: above this, weights go to `<file>.data`
EXTERNAL_DATA_BYTES = 2**31 - 2**27

# Trace sizes: >= 2 and pairwise distinct on every dynamic axis, so the exporter neither
# specialises an axis to 0/1 nor unifies two axes that merely happen to be equal.
EX_BATCH, EX_CHUNK, EX_PAST, EX_FRAMES, EX_SAMPLES = 2, 3, 5, 7, 32000

_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
                onnx.TensorProto.BOOL: "bool"}


# ---------------------------------------------------------------------------------------------
# Export wrappers: one nn.Module per graph, positional tensors in, a flat tuple out


# The encoder's wrapper is pianolm.export.encoders.EncoderGraph: waveform [batch, samples] ->
# embeddings [batch, frames, embed_dim] and the rolls onset, offset, frame, velocity
# [batch, frames, 88] (the roll-decoding baseline of `pianolm eval`).


def _flat(cache: Sequence[KV]) -> tuple[Tensor, ...]:
    """Per-layer (K, V) pairs -> K0, V0, K1, V1, ...: the graphs' tensor order (kv_names)."""
    return tuple(t for kv in cache for t in kv)


def _pairs(flat: Sequence[Tensor]) -> list[KV]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


class CrossKVGraph(nn.Module):
    """embeddings [batch, frames, enc_dim] -> every layer's cross-attention K^T [batch, heads,
    head_dim, frames] and V [batch, heads, frames, head_dim] (then a pointer head's keys^T
    [batch, 1, head_dim, frames]), once per segment."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, embeddings: Tensor) -> tuple[Tensor, ...]:
        return self.decoder.cross_kv(embeddings).tensors()


class DecoderStepGraph(nn.Module):
    """One decoder step over a chunk of tokens (Decoder.step):

    tokens, positions [batch, chunk] int64; key_mask [batch, past_plus_chunk] bool; a
    time-aligned decoder's query_ticks [batch, chunk] int64; then the caches, flat: per layer
    past K, V [batch, heads, past, head_dim], then CrossKVGraph's outputs -> logits [batch,
    vocab] (after the chunk's last token), per layer present K, V [batch, heads,
    past_plus_chunk, head_dim] (past ++ the chunk).
    """

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, tokens: Tensor, positions: Tensor, key_mask: Tensor, *rest: Tensor
                ) -> tuple[Tensor, ...]:
        cfg = self.decoder.cfg
        ticks, caches = (rest[0], rest[1:]) if cfg.time_aligned else (None, rest)
        n = 2 * cfg.n_layers
        logits, present = self.decoder.step(
            tokens, positions, key_mask, _pairs(caches[:n]),
            CrossCache.from_tensors(caches[n:], cfg.n_layers), ticks)
        return (logits, *_flat(present))


@dataclass
class _Plan:
    """How to trace one graph: module, example inputs, IO names and named dynamic axes."""

    module: nn.Module
    example: tuple[Tensor, ...]
    io: tuple[tuple[str, ...], tuple[str, ...]]
    axes: dict[str, dict[int, str]]  # input and output name -> axis -> dim name
    named_args: int | None = None  # forward's named parameters, when the rest are *varargs


def _encoder_plan(encoder: nn.Module, samples: int) -> _Plan:
    g = torch.Generator().manual_seed(0)
    wave = 0.1 * torch.randn(EX_BATCH, samples, generator=g)
    frames = {0: "batch", 1: "frames"}
    return _Plan(EncoderGraph(encoder), (wave,), ENCODER_ROLLS_IO,
                 {"waveform": {0: "batch", 1: "samples"}, "embeddings": frames,
                  **{key: frames for key in ROLL_KEYS}})


def _cache_axes(names: Sequence[str], length: str) -> dict[str, dict[int, str]]:
    """Dynamic axes of per-layer caches (manifest.cache_length_axis says where the length is)."""
    return {name: {0: "batch", cache_length_axis(name): length} for name in names}


def _cross_plan(decoder: Decoder) -> _Plan:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(EX_BATCH, EX_FRAMES, decoder.cfg.enc_dim, generator=g)
    io = cross_kv_io(decoder.cfg.n_layers, decoder.pointer is not None)
    return _Plan(CrossKVGraph(decoder), (emb,), io,
                 {"embeddings": {0: "batch", 1: "frames"}, **_cache_axes(io[1], "frames")})


def _step_plan(decoder: Decoder) -> _Plan:
    c = decoder.cfg
    g = torch.Generator().manual_seed(0)
    b, n, p, t = EX_BATCH, EX_CHUNK, EX_PAST, EX_FRAMES
    pointer = decoder.pointer is not None
    past, cross = kv_names("past_key_values", c.n_layers), cross_names(c.n_layers, pointer)
    caches = [torch.randn(cache_shape(name, b, c.n_heads, c.head_dim, length), generator=g)
              for names, length in ((past, p), (cross, t)) for name in names]
    ticks = (torch.randint(0, t * c.ticks_per_frame, (b, n), generator=g),) if c.time_aligned \
        else ()
    example = (torch.randint(0, c.vocab_size, (b, n), generator=g),
               torch.arange(p, p + n).expand(b, n).contiguous(),
               torch.ones(b, p + n, dtype=torch.bool), *ticks, *caches)
    return _Plan(DecoderStepGraph(decoder), example, step_io(c.n_layers, c.time_aligned, pointer), {
        "tokens": {0: "batch", 1: "chunk"}, "positions": {0: "batch", 1: "chunk"},
        "query_ticks": {0: "batch", 1: "chunk"},
        "key_mask": {0: "batch", 1: "past_plus_chunk"}, "logits": {0: "batch"},
        **_cache_axes(past, "past"), **_cache_axes(cross, "frames"),
        **_cache_axes(kv_names("present", c.n_layers), "past_plus_chunk")},
        named_args=3)


# ---------------------------------------------------------------------------------------------
# Exporting one graph


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter's expected chatter (shared axis names, pytree deprecations)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*will not be used, since it shares")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*torchvision.*")
        yield


def _param_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in
               list(module.parameters()) + list(module.buffers()))


def _export(plan: _Plan, path: Path, opset: int, external_data_bytes: int) -> None:
    inputs, outputs = plan.io
    # torch.export's dynamic_shapes, one entry per forward argument (a tuple for *varargs); a
    # string names the axis in the ONNX graph (the exporter turns it into Dim.DYNAMIC).
    axes = [dict(plan.axes[name]) for name in inputs]
    dynamic = tuple(axes) if plan.named_args is None else (
        *axes[:plan.named_args], tuple(axes[plan.named_args:]))
    with _quiet_exporter(), torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            plan.module.eval(), plan.example, dynamo=True, opset_version=opset,
            input_names=list(inputs), output_names=list(outputs), dynamic_shapes=dynamic,
            optimize=True, verbose=False)
    model = program.model
    # Name every dynamic axis of the outputs too: the exporter writes the sympy expression
    # ("chunk + past", "Min(...)"), which means nothing to a user or to trtexec.
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        named = plan.axes.get(value.name, {})
        if value.shape is not None and named:
            value.shape = ir.Shape([named.get(i, d if isinstance(d, int) else str(d))
                                    for i, d in enumerate(value.shape)])
    model.metadata_props["pianolm.graph"] = path.stem
    program.save(path, external_data=_param_bytes(plan.module) > external_data_bytes)


def _external_file(path: Path) -> str | None:
    """The external-data file a saved graph refers to, if any (one file, by construction)."""
    model = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for t in model.graph.initializer for entry in t.external_data
                 if entry.key == "location"}
    if len(locations) > 1:
        raise RuntimeError(f"{path}: weights spread over several files {sorted(locations)}")
    return locations.pop() if locations else None


def _tensor_specs(values: Sequence[onnx.ValueInfoProto], path: Path) -> tuple[TensorSpec, ...]:
    specs = []
    for v in values:
        tt = v.type.tensor_type
        if tt.elem_type not in _ONNX_DTYPES:
            raise RuntimeError(f"{path}: {v.name} has element type {tt.elem_type}, which the "
                               f"manifest cannot describe")
        shape = tuple(d.dim_param if d.HasField("dim_param") else int(d.dim_value)
                      for d in tt.shape.dim)
        specs.append(TensorSpec(v.name, _ONNX_DTYPES[tt.elem_type], shape))
    return tuple(specs)


def _graph_spec(path: Path, precision: str) -> GraphSpec:
    """Describe a written graph from the file itself, so the manifest cannot drift from it."""
    model = onnx.load(str(path), load_external_data=False)
    external = _external_file(path)
    size = path.stat().st_size + ((path.parent / external).stat().st_size if external else 0)
    return GraphSpec(path.name, precision, _tensor_specs(model.graph.input, path),
                     _tensor_specs(model.graph.output, path), size, file_sha256(path), external)


def _save_proto(model: onnx.ModelProto, path: Path, external_data_bytes: int) -> None:
    weights = sum(t.ByteSize() for t in model.graph.initializer)
    if weights > external_data_bytes:
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=f"{path.name}.data",
                        size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _copy_graph(src: Path, dst_dir: Path) -> None:
    shutil.copy2(src, dst_dir / src.name)
    external = _external_file(src)
    if external:
        shutil.copy2(src.parent / external, dst_dir / external)


# ---------------------------------------------------------------------------------------------
# Precisions: fp16 and int8 folders are derived from an fp32 folder, at the ONNX level


def _scopes(node: onnx.NodeProto) -> tuple[list[str], str]:
    """(module paths, class hierarchy) the dynamo exporter records on every node."""
    meta = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        scopes = []
    return [str(s) for s in scopes], meta.get("pkg.torch.onnx.class_hierarchy", "")


def _is_head(node: onnx.NodeProto) -> bool:
    return "decoder.head" in _scopes(node)[0]


def _is_norm(node: onnx.NodeProto) -> bool:
    return "torch.nn.modules.normalization.RMSNorm" in _scopes(node)[1]


def _toposort(graph: onnx.GraphProto) -> None:
    """Order nodes so each comes after its inputs' producers, as ONNX requires (the fp16
    converter appends its Cast nodes at the end). Stable: an ordered graph stays as it is."""
    ready = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                ordered.append(copy)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise RuntimeError(f"graph {graph.name!r}: a cycle or a missing input at node "
                               f"{rest[0].name!r}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _drop_noop_casts(graph: onnx.GraphProto) -> None:
    """Remove Casts of an initializer to its own type (the converter casts kept-fp32 weights,
    e.g. the LM head's, "back" to fp32)."""
    types = {t.name: t.data_type for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {}
    for node in graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if (node.op_type == "Cast" and node.input[0] in types and types[node.input[0]] == to
                and node.output[0] not in outputs):
            alias[node.output[0]] = node.input[0]
    keep = []
    for node in graph.node:
        if node.op_type == "Cast" and node.output[0] in alias:
            continue
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for i, name in enumerate(copy.input):
            copy.input[i] = alias.get(name, name)
        keep.append(copy)
    del graph.node[:]
    graph.node.extend(keep)


def _to_fp16(src: Path, dst: Path, kind: str, external_data_bytes: int) -> None:
    """fp16 weights and activations, with RMSNorm, softmax and the LM head kept in fp32 (a
    norm's sum of squares and the logits need the range; DESIGN.md "Known traps")."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    blocked = [n.name for n in model.graph.node if _is_norm(n) or _is_head(n)]
    if kind == "step" and not any(_is_norm(n) for n in model.graph.node):
        # Without the exporter's metadata the norms would silently drop to fp16.
        raise RuntimeError(f"{src}: no RMSNorm nodes found in the graph's metadata; refusing "
                           f"an fp16 conversion that cannot keep them in fp32")
    keep_io = {"cross_kv": ["embeddings"], "step": ["logits"]}[kind]
    converted = convert_float_to_float16(
        model, keep_io_types=keep_io, op_block_list=[*DEFAULT_OP_BLOCK_LIST, "Softmax"],
        node_block_list=blocked)
    del converted.graph.value_info[:]  # some entries keep their fp32 type: stale, drop them
    _drop_noop_casts(converted.graph)
    _toposort(converted.graph)
    _save_proto(converted, dst, external_data_bytes)


@contextlib.contextmanager
def logger_at(name: str | None, level: int) -> Iterator[None]:
    """Set a chatty library logger's level (None: the root logger) for a block, then restore
    it."""
    log = logging.getLogger(name)
    before = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(before)


# int8 = 8-bit weight blocks (MatMulNBits) with int8 arithmetic (accuracy_level 4; level 0, fp32
# arithmetic, ran 4x slower than fp32). Small preset onset step, batch 1, 2 cores: 1.7-2.1x fp32,
# a few per cent faster than ORT dynamic quantization (MatMulInteger, the previous int8) with
# less logit error; block 128 vs 32 / 256: no clear winner (benchmarks/int8_variants.py).
INT8_BLOCK_SIZE = 128
INT8_ACCURACY_LEVEL = 4


def _to_int8(src: Path, dst: Path, external_data_bytes: int,
             block_size: int = INT8_BLOCK_SIZE) -> None:
    """8-bit weights in blocks of `block_size` along K (one fp32 scale each, symmetric), the
    MatMuls computed in int8 with activations quantized inside the kernel; attention's
    activation x activation MatMuls and the LM head stay fp32 (greedy decode reads its argmax)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    model = onnx.load(str(src))
    head = [n.name for n in model.graph.node if _is_head(n)]
    config = nbits.DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=INT8_ACCURACY_LEVEL,
        bits=8)
    with logger_at(nbits.__name__, logging.WARNING):  # it logs every node it skips at INFO
        quantizer = nbits.MatMulNBitsQuantizer(model, nodes_to_exclude=head, algo_config=config)
        quantizer.process()
    _save_proto(quantizer.model.model, dst, external_data_bytes)


def convert_model(src_dir: str | Path, out_dir: str | Path, precision: str,
                  external_data_bytes: int = EXTERNAL_DATA_BYTES) -> Manifest:
    """Derive an fp16 or int8 folder from an fp32 one (no torch involved).

    The encoder stays fp32 in both: its front-end needs fp32 range (power spectra overflow
    fp16), ONNX Runtime CPU crashed optimising fp16 conv+GRU graphs (1.32, ORT_ENABLE_ALL), and
    int8 ConvInteger/MatMulInteger ran 2-3x slower than fp32 there. It runs once per segment;
    the decoders run once per token.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    src = load_manifest(src_dir)
    if src.precision != "fp32":
        raise ValueError(f"{src_dir}: convert from an fp32 folder, this one is {src.precision}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # a half-written folder must not look complete
    _copy_graph(src.path(src.encoder.graph), out)
    encoder = dataclasses.replace(src.encoder, graph=_graph_spec(out / src.encoder.graph.file,
                                                                 "fp32"))
    stages = []
    for s in src.stages:
        graphs = {}
        for kind in ("cross_kv", "step"):
            g = getattr(s, kind)
            dst = out / g.file
            if precision == "fp32":
                _copy_graph(src.path(g), out)
            elif precision == "fp16":
                _to_fp16(src.path(g), dst, kind, external_data_bytes)
            else:
                _to_int8(src.path(g), dst, external_data_bytes)
            graphs[kind] = _graph_spec(dst, precision)
        stages.append(dataclasses.replace(s, **graphs))
    manifest = dataclasses.replace(src, precision=precision, encoder=encoder,
                                   stages=tuple(stages), folder=None)
    write_manifest(manifest, out)
    return load_manifest(out)


# ---------------------------------------------------------------------------------------------
# The whole folder


def _versions() -> dict[str, str]:
    return {"python": platform.python_version(),
            **package_versions(("pianolm", "torch", "onnx", "onnxscript", "onnx-ir",
                                "onnxruntime", "numpy"))}


def _jsonable(value: Any) -> Any:
    """Dataclass configs -> JSON types (tuples become lists, anything odd a string)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=str))


def _encoder_config(encoder: nn.Module) -> dict[str, Any]:
    """The encoder's config, front-end parameters included, for the manifest (informative)."""
    cfg = getattr(encoder, "config", None)
    out: dict[str, Any] = {"class": f"{type(encoder).__module__}.{type(encoder).__qualname__}"}
    if cfg is not None:
        out.update(_jsonable(cfg) if dataclasses.is_dataclass(cfg) else {"repr": repr(cfg)})
    return out


def roll_thresholds(source_checkpoint: str | Path | None,
                    metadata: dict[str, Any] | None = None) -> RollsSpec:
    """The roll-decoding thresholds for the manifest: tuned ones from the checkpoint's metadata
    ("rolls", written by `pianolm train tune-rolls` and `assemble`) or from `metadata`, else
    runtime/rolls.py's defaults, marked untuned."""
    if source_checkpoint is not None:
        from pianolm.export.checkpoint import read_config

        tuned = (read_config(source_checkpoint)[1].get("metadata") or {}).get("rolls")
        where = "the checkpoint's metadata (pianolm train tune-rolls)"  # not a build path
    else:
        tuned, where = (metadata or {}).get("rolls"), "export metadata"
    if isinstance(tuned, dict) and tuned:
        return RollsSpec(RollDecodeConfig.from_dict(tuned), tuned=True, thresholds_from=where)
    return RollsSpec(RollDecodeConfig(), tuned=False,
                     thresholds_from="runtime/rolls.py defaults (Kong et al.)")


def export_model(system: TranscriptionSystem, out_dir: str | Path, precision: str = "fp32",
                 source_checkpoint: str | Path | None = None, opset: int = OPSET, *,
                 seed: int | None = None, metadata: dict[str, Any] | None = None,
                 example_samples: int = EX_SAMPLES,
                 external_data_bytes: int = EXTERNAL_DATA_BYTES) -> Manifest:
    """Export `system` into `out_dir` (graphs first, manifest.json last) and return the
    validated manifest.

    source_checkpoint: the checkpoint folder the weights came from (its hash goes into the
    manifest, its metadata's tuned roll thresholds into `encoder.rolls`); None marks a random
    initialisation (`seed` recorded if given).
    example_samples: waveform length used to trace the encoder (the axis stays dynamic).
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} < {MIN_OPSET}: the exporter needs opset >= {MIN_OPSET}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    out = Path(out_dir)
    if precision != "fp32":
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-fp32-") as tmp:
            export_model(system, tmp, "fp32", source_checkpoint, opset, seed=seed,
                         metadata=metadata, example_samples=example_samples,
                         external_data_bytes=external_data_bytes)
            return convert_model(tmp, out, precision, external_data_bytes)

    out.mkdir(parents=True, exist_ok=True)
    stale = out / MANIFEST_FILE
    stale.unlink(missing_ok=True)  # a half-written folder must not look complete
    system = system.float().eval()
    enc = system.encoder

    def export(plan: _Plan, name: str) -> GraphSpec:
        t0 = time.perf_counter()
        _export(plan, out / name, opset, external_data_bytes)
        log.info("exported %s in %.1f s", name, time.perf_counter() - t0)
        return _graph_spec(out / name, "fp32")

    encoder = EncoderSpec(
        name=system.config.encoder, embed_dim=int(enc.embed_dim),
        frames_per_second=float(enc.frames_per_second),
        frames_per_segment=int(enc.frames_per_segment), config=_encoder_config(enc),
        graph=export(_encoder_plan(enc, example_samples), "encoder.onnx"),
        rolls=roll_thresholds(source_checkpoint, metadata))
    stages = []
    for stage, decoder in system.decoders.items():
        cfg = decoder.cfg
        stages.append(StageSpec(
            name=stage, task_token=vocab.TASK_TOKEN[stage],
            decoder=DecoderSpec(**{f.name: getattr(cfg, f.name)
                                   for f in dataclasses.fields(DecoderSpec)}),
            cross_kv=export(_cross_plan(decoder), f"{stage}_cross_kv.onnx"),
            step=export(_step_plan(decoder), f"{stage}_step.onnx")))

    if source_checkpoint is not None:
        from pianolm.export.checkpoint import checkpoint_hash

        source = SourceSpec(checkpoint=str(source_checkpoint),
                            sha256=checkpoint_hash(source_checkpoint), seed=seed,
                            metadata=_jsonable(metadata or {}))
    else:
        source = SourceSpec(random_init=True, seed=seed, metadata=_jsonable(metadata or {}))
    manifest = Manifest(precision="fp32", opset=opset, sample_rate=16000,
                        segment_samples=SEGMENT_SAMPLES, encoder=encoder, stages=tuple(stages),
                        source=source, versions=_versions(),
                        input_peak=getattr(system.encoder, "input_peak", None))
    write_manifest(manifest, out)
    return load_manifest(out)


# ---------------------------------------------------------------------------------------------
# Parity: ONNX Runtime vs PyTorch on fresh random inputs


@dataclass(frozen=True)
class Parity:
    """One graph output compared: max |ort - torch| and that over max |torch|."""

    graph: str
    output: str
    batch: int
    max_abs: float
    max_rel: float

    def __str__(self) -> str:
        return (f"{self.graph:<18} {self.output:<11} batch {self.batch}: max abs "
                f"{self.max_abs:.2e}, rel {self.max_rel:.2e}")


def random_step_inputs(cfg: Any, batch: int, chunk: int, past: int, frames: int,
                       rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Step-graph inputs as the decode loop makes them: some padding, per-row positions."""
    rows = RowPositions.empty(batch)
    if past:
        rows.advance(rng.random((batch, past)) > 0.3)
    mask = rng.random((batch, chunk)) > 0.3
    mask[:, -1] = True  # the last position's logits are the ones read
    positions, key_mask = rows.advance(mask)
    tokens = rng.integers(0, cfg.vocab_size, (batch, chunk)).astype(np.int64)
    feeds = {"tokens": tokens, "positions": positions, "key_mask": key_mask}
    if cfg.time_aligned:
        rows.ticks = rng.integers(0, frames * cfg.ticks_per_frame, batch)
        feeds["query_ticks"] = rows.advance_ticks(tokens, mask)
    for names, length in ((cfg.past_names, past), (cfg.cross_names, frames)):
        for name in names:
            shape = cache_shape(name, batch, cfg.n_heads, cfg.head_dim, length)
            feeds[name] = rng.normal(size=shape).astype(np.float32)
    return feeds


def graph_parity(system: TranscriptionSystem, model_dir: str | Path, batch: int, *,
                 seed: int = 0, samples: int | None = None, chunk: int = 3, past: int = 7,
                 threads: int = 1) -> list[Parity]:
    """Run every graph of the folder in ONNX Runtime (CPU) and its PyTorch module on the same
    fresh random inputs; compare every output. fp16/int8 graphs are fed their own input dtypes
    and compared against fp32 PyTorch."""
    import onnxruntime as ort

    manifest = load_manifest(model_dir)
    rng = np.random.default_rng(seed)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    frames = manifest.encoder.frames_per_segment
    samples = samples or manifest.segment_samples
    jobs: list[tuple[str, GraphSpec, nn.Module, dict[str, np.ndarray]]] = [
        ("encoder", manifest.encoder.graph, EncoderGraph(system.encoder),
         {"waveform": (0.1 * rng.normal(size=(batch, samples))).astype(np.float32)})]
    for s in manifest.stages:
        dec = system.decoders[s.name]
        emb = rng.normal(size=(batch, frames, s.decoder.enc_dim)).astype(np.float32)
        jobs.append((f"{s.name}.cross_kv", s.cross_kv, CrossKVGraph(dec), {"embeddings": emb}))
        jobs.append((f"{s.name}.step", s.step, DecoderStepGraph(dec),
                     random_step_inputs(s.decoder, batch, chunk, past, frames, rng)))
    out = []
    for name, graph, module, feeds in jobs:
        session = ort.InferenceSession(str(manifest.path(graph)), options,
                                       providers=["CPUExecutionProvider"])
        typed = {t.name: feeds[t.name].astype(t.dtype) for t in graph.inputs}
        got = session.run([t.name for t in graph.outputs], typed)
        with torch.inference_mode():
            ref = module.eval()(*(torch.from_numpy(feeds[t.name]) for t in graph.inputs))
        ref = ref if isinstance(ref, tuple) else (ref,)
        for spec, a, b in zip(graph.outputs, got, ref):
            b = b.float().numpy()
            if a.shape != b.shape:
                raise AssertionError(f"{name}.{spec.name}: ORT shape {a.shape} != torch "
                                     f"{b.shape}")
            err = float(np.abs(a.astype(np.float32) - b).max(initial=0.0))
            scale = float(np.abs(b).max(initial=0.0))
            out.append(Parity(name, spec.name, batch, err, err / max(scale, 1e-30)))
    return out


# ---------------------------------------------------------------------------------------------
# `pianolm export`


def _build_random(preset: str, encoder: str, flattened: bool, seed: int,
                  options: dict[str, Any]) -> TranscriptionSystem:
    from pianolm.export.system import SystemConfig

    torch.manual_seed(seed)
    return TranscriptionSystem(SystemConfig(encoder=encoder, decoder=preset,
                                            hierarchical=not flattened,
                                            decoder_options=options)).eval()


def main_export(argv: Sequence[str] | None = None) -> int:
    """`pianolm export`: a checkpoint (or random weights) -> an ONNX model folder."""
    from pianolm.export.decoder import PRESETS
    from pianolm.export.encoders import ENCODERS

    ap = argparse.ArgumentParser(
        prog="pianolm export",
        description="Export a model to a folder of ONNX graphs + manifest.json "
                    "(docs/manifest.md).")
    src = ap.add_argument_group("weights (one of)")
    src.add_argument("--checkpoint", help="a checkpoint folder (config.json + model.safetensors)")
    src.add_argument("--random-init", action="store_true",
                     help="random weights from --preset/--encoder/--seed (cost benchmarks, tests)")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="decoder size (with --random-init)")
    ap.add_argument("--encoder", choices=sorted(ENCODERS), default="hppnet",
                    help="encoder (with --random-init; default hppnet)")
    ap.add_argument("--seed", type=int, default=0, help="seed for --random-init")
    ap.add_argument("--flattened", action="store_true",
                    help="the flattened baseline (one 'flat' stage) instead of three stages")
    ap.add_argument("--cross-positions", choices=CROSS_POSITIONS, default="token",
                    help="with --random-init: cross-attention positions (docs/decoder.md)")
    ap.add_argument("--look-ahead", action="store_true", help="with --random-init: the "
                    "look-ahead prior (time positions)")
    ap.add_argument("--time-head", choices=TIME_HEADS, default="lm",
                    help="with --random-init: 'pointer' time head (time positions)")
    ap.add_argument("--out", required=True, help="output folder, e.g. engines/NAME")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32")
    ap.add_argument("--opset", type=int, default=OPSET)
    ap.add_argument("--default-decoder", choices=DECODERS, default="lm",
                    help="how `pianolm transcribe` reads notes from this model unless told "
                         "(manifest default_decoder)")
    ap.add_argument("--verify", action="store_true",
                    help="compare every graph with PyTorch on random inputs (batch 1, 2 s clip)")
    args = ap.parse_args(argv)
    if bool(args.checkpoint) == bool(args.random_init):
        ap.error("give exactly one of --checkpoint or --random-init")
    if args.random_init and not args.preset:
        ap.error("--random-init needs --preset")
    if args.checkpoint and args.preset:
        ap.error("--preset applies to --random-init only (a checkpoint has its own config)")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)  # our progress lines, not the ONNX optimizer's INFO chatter

    from pianolm.export.checkpoint import CheckpointError, load_system

    t0 = time.perf_counter()
    try:
        if args.checkpoint:
            system = load_system(args.checkpoint)
            if args.flattened and system.config.hierarchical:
                raise CheckpointError(f"{args.checkpoint}: --flattened given, but the "
                                      f"checkpoint is hierarchical (stages {system.stages})")
            manifest = export_model(system, args.out, args.precision, args.checkpoint,
                                    args.opset)
        else:
            options = {"cross_positions": args.cross_positions, "look_ahead": args.look_ahead,
                       "time_head": args.time_head}
            system = _build_random(args.preset, args.encoder, args.flattened, args.seed, options)
            manifest = export_model(system, args.out, args.precision, None, args.opset,
                                    seed=args.seed, metadata={"preset": args.preset})
    except (CheckpointError, ValueError, OSError) as e:
        print(f"pianolm export: error: {e}", file=sys.stderr)
        return 2
    if args.default_decoder != manifest.default_decoder:
        write_manifest(replace(manifest, default_decoder=args.default_decoder), args.out)
        manifest = load_manifest(args.out)
    print(f"wrote {args.out} ({manifest.precision}, opset {manifest.opset}, stages "
          f"{', '.join(manifest.stage_names)}) in {time.perf_counter() - t0:.0f} s")
    for graph in manifest.graphs().values():
        print(f"  {graph.file:<24} {graph.precision:<5} {graph.bytes / 1e6:9.2f} MB")
    if args.verify:
        worst = 0.0
        for p in graph_parity(system, args.out, batch=1, samples=EX_SAMPLES):
            print(f"  {p}")
            worst = max(worst, p.max_rel)
        print(f"max relative error {worst:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_export())
