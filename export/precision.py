"""fp16 and int8 model folders, derived from an fp32 folder at the ONNX level (`convert_model`),
and the graph-file helpers export_model shares: describing a written graph for the manifest
(`graph_spec`), saving a graph with its weights outside the protobuf past 2 GiB.

Torch-free: it needs neither torch nor anything torch-side, only onnx, ONNX Runtime's fp16
converter and quantizer, and the runtime's manifest. It finds the RMSNorms and the LM head by
the module scopes the dynamo exporter records on each node's metadata.

Top to bottom: reading, writing and copying graph files; the fp16 conversion; the int8
quantization; `convert_model`, which derives a whole folder.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx

from pianolm.runtime.manifest import (
    MANIFEST_FILE,
    PRECISIONS,
    GraphSpec,
    Manifest,
    TensorSpec,
    file_sha256,
    load_manifest,
    write_manifest,
)

# protobuf cannot serialise a message over 2 GiB: above this, weights go to `<file>.data`
EXTERNAL_DATA_BYTES = 2**31 - 2**27

_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
                onnx.TensorProto.BOOL: "bool"}


# ---------------------------------------------------------------------------------------------
# Graph files


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


def graph_spec(path: Path, precision: str) -> GraphSpec:
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
    norm's sum of squares and the logits need the range; docs/model.md "Export traps")."""
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
# arithmetic, ran slower than fp32). Against fp32, ORT dynamic quantization (MatMulInteger, the
# previous int8) and blocks of 32 / 256: docs/manifest.md, "Precisions", and
# benchmarks/results/int8_variants_small.json (benchmarks/int8_variants.py).
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


def _to_int8_matmuls(src: Path, dst: Path) -> None:
    """ONNX Runtime's dynamic quantization of an encoder's MatMuls (int8 weights, activations
    quantized per call); everything else stays fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with logger_at(None, logging.ERROR):  # it advises pre-processing on the root logger
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"])


def convert_model(src_dir: str | Path, out_dir: str | Path, precision: str,
                  external_data_bytes: int = EXTERNAL_DATA_BYTES) -> Manifest:
    """Derive an fp16 or int8 folder from an fp32 one (no torch involved).

    The encoder stays fp32 in both: its front-end needs fp32 range (power spectra overflow
    fp16), ONNX Runtime CPU crashed optimising fp16 conv+GRU graphs (1.32, ORT_ENABLE_ALL), and
    int8 ConvInteger/MatMulInteger ran slower than fp32 there (docs/manifest.md, "Precisions").
    It runs once per segment; the decoders run once per token. A rolls-only model (no stages)
    is its encoder: int8 quantizes the encoder's MatMuls, fp16 is refused.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    src = load_manifest(src_dir)
    if src.precision != "fp32":
        raise ValueError(f"{src_dir}: convert from an fp32 folder, this one is {src.precision}")
    if src.rolls_only and precision == "fp16":
        raise ValueError("a rolls-only model is its encoder, which stays fp32 (its power "
                         "spectra overflow fp16): use fp32, or int8")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # a half-written folder must not look complete
    encoder_file = out / src.encoder.graph.file
    if src.rolls_only and precision == "int8":
        # Its encoder is all there is to quantize: the MatMuls (fc5, the heads), 8-bit dynamic.
        # Convs stay fp32 (ConvInteger ran 4x slower than fp32 on ORT CPU: docs/import.md).
        _to_int8_matmuls(src.path(src.encoder.graph), encoder_file)
        encoder = dataclasses.replace(src.encoder, graph=graph_spec(encoder_file, "int8"))
    else:
        _copy_graph(src.path(src.encoder.graph), out)
        encoder = dataclasses.replace(src.encoder, graph=graph_spec(encoder_file, "fp32"))
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
            graphs[kind] = graph_spec(dst, precision)
        stages.append(dataclasses.replace(s, **graphs))
    manifest = dataclasses.replace(src, precision=precision, encoder=encoder,
                                   stages=tuple(stages), folder=None)
    write_manifest(manifest, out)
    return load_manifest(out)
