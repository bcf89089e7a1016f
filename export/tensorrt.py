"""TensorRT: the static compatibility check of exported graphs (needs onnx).

- `check_tensorrt_compat(onnx_path, profile)`: problems TensorRT's ONNX parser would hit, found
  without TensorRT: op types it lacks (table below), If/Loop/Scan (TensorRT cannot build an If
  that merges prefill and step), tensors of unknown rank after ONNX shape inference, data types
  an op does not take (int64 and bool are fine where the table lists them; no float64), inputs
  that must be initializers, and an inconsistent optimization profile.
- `check_model(model_dir, profile)`: the check over every graph of an exported folder;
  `pianolm build-engines` runs it where onnx is importable.

Building engines, the optimization profiles and the trtexec / polygraphy scripts are in
runtime/trt_build.py (`pianolm build-engines`, torch-free and onnx-free, for the GPU server).

Input types (onnx-tensorrt 10.x, ModelImporter importInputs / convertDtype): INT64 inputs are
native TensorRT INT64 tensors (the parser warns "Make sure input tokens has Int64 binding"), and
BOOL inputs are kBOOL, so tokens/positions (int64) and key_mask (bool) need no change.

Torch-free: onnx and the runtime only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import onnx

from pianolm.runtime.manifest import TensorSpec, load_manifest
from pianolm.runtime.trt_build import Profile, check_profile, default_profile

# ---------------------------------------------------------------------------------------------
# What TensorRT's ONNX parser supports: onnx-tensorrt docs/operators.md (TensorRT 10.x; opsets
# 9..20), op -> the types of its data input. Ops absent from this table are unsupported there
# ("N" rows: ConvInteger, MatMulInteger, DynamicQuantizeLinear, DFT, STFT, sequences, ...).

_F = ("float32", "float16", "bfloat16")
_FI = (*_F, "int32", "int64")
_FIB = (*_FI, "bool")
_TABLE: dict[tuple[str, ...], str] = {
    _F: "Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv "
        "ConvTranspose Cos Cosh CumSum DeformConv Dropout Einsum Elu Erf Exp Floor Gemm "
        "GlobalAveragePool GlobalLpPool GlobalMaxPool GridSample GroupNormalization GRU "
        "HardSigmoid HardSwish Hardmax ImageScaler InstanceNormalization IsInf "
        "LayerNormalization LeakyRelu Log LogSoftmax LRN LSTM LpNormalization LpPool MatMul "
        "MaxPool MeanVarianceNormalization Mish NonMaxSuppression NonZero ParametricSoftplus "
        "Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike "
        "Reciprocal Resize RNN RoiAlign Round ScaledTanh Scan Selu Sigmoid Sin Sinh Softmax "
        "Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample",
    _FI: "Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less "
         "LessOrEqual Max Mean Min Mod Mul Neg Pad Range ReduceL1 ReduceL2 ReduceLogSum "
         "ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare "
         "Relu Scatter ScatterElements ScatterND Shrink Sign SpaceToDepth Sub Sum TopK",
    _FIB: "Concat Constant ConstantOfShape Expand EyeLike Flatten Gather GatherElements "
          "GatherND Identity If Loop OneHot Reshape ReverseSequence Shape Size Slice Split "
          "Squeeze Tile Transpose Trilu Unsqueeze Where",
    (*_FIB, "uint8"): "Cast CastLike",
    ("bool",): "And Not Or Xor",
    ("int8", "float8e4m3fn", "int4"): "DequantizeLinear",
    (*_FI, "int8"): "Gelu",
}
TRT_OPS: dict[str, frozenset[str]] = {op: frozenset(types) for types, ops in _TABLE.items()
                                      for op in ops.split()}
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
TRT_OPSETS = range(9, 21)
# Inputs the parser requires to be initializers / constants: op -> input index.
CONSTANT_INPUTS = {"Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "Pad": 3, "CumSum": 1, "TopK": 1,
                   **{op: 1 for op in TRT_OPS if op.startswith("Reduce")}}
# Which input carries the data whose type the table constrains (default: input 0).
_DATA_INPUT = {"Where": 1, "ConstantOfShape": None}
IO_TYPES = frozenset({"float32", "float16", "bfloat16", "int32", "int64", "bool", "uint8"})
# the only int64 graph inputs a model should have
INT64_INPUTS = ("tokens", "positions", "query_ticks")

_NAMES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
          onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.DOUBLE: "float64",
          onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
          onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8",
          onnx.TensorProto.BOOL: "bool", onnx.TensorProto.FLOAT8E4M3FN: "float8e4m3fn",
          onnx.TensorProto.INT4: "int4"}


# ---------------------------------------------------------------------------------------------
# The static check


def _all_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _all_nodes(sub)


def _types(model: onnx.ModelProto) -> dict[str, tuple[str, int | None]]:
    """Tensor name -> (dtype, rank or None) from inputs, outputs, value_info and initializers."""
    out: dict[str, tuple[str, int | None]] = {}
    g = model.graph
    for v in list(g.input) + list(g.output) + list(g.value_info):
        tt = v.type.tensor_type
        rank = len(tt.shape.dim) if tt.HasField("shape") else None
        out[v.name] = (_NAMES.get(tt.elem_type, f"type{tt.elem_type}"), rank)
    for t in g.initializer:
        out[t.name] = (_NAMES.get(t.data_type, f"type{t.data_type}"), len(t.dims))
    for node in g.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = (_NAMES.get(attr.t.data_type, "?"), len(attr.t.dims))
    return out


def _summarise(kind: str, nodes: dict[str, list[str]]) -> list[str]:
    return [f"{kind.format(op=op)} ({len(names)} node{'s' * (len(names) > 1)}, e.g. "
            f"{names[0]!r})" for op, names in sorted(nodes.items())]


def check_tensorrt_compat(onnx_path: str | Path, profile: Profile | None = None,
                          int64_inputs: Sequence[str] = INT64_INPUTS) -> list[str]:
    """Problems TensorRT (10.x ONNX parser) would have with this graph; empty means none found.

    Weights are not loaded: the check reads the graph, types and shapes only.
    """
    path = Path(onnx_path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError, OSError
        return [f"{path.name}: not a readable ONNX file ({type(e).__name__}: {e})"]
    return [f"{path.name}: {p}" for p in _graph_problems(model, profile, int64_inputs)]


def _graph_problems(model: onnx.ModelProto, profile: Profile | None,
                    int64_inputs: Sequence[str]) -> list[str]:
    problems: list[str] = []
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version not in TRT_OPSETS:
            problems.append(f"opset {imp.version}: TensorRT 10 parses opsets "
                            f"{TRT_OPSETS.start}..{TRT_OPSETS.stop - 1}")

    unsupported: dict[str, list[str]] = {}
    control: dict[str, list[str]] = {}
    for node in _all_nodes(model.graph):
        if node.domain not in ("", "ai.onnx"):
            unsupported.setdefault(f"{node.domain}::{node.op_type}", []).append(node.name)
        elif node.op_type in CONTROL_FLOW:
            control.setdefault(node.op_type, []).append(node.name)
        elif node.op_type not in TRT_OPS:
            unsupported.setdefault(node.op_type, []).append(node.name)
    problems += _summarise("op {op} is not supported by TensorRT's ONNX parser", unsupported)
    problems += _summarise("control flow {op}: build one graph without If/Loop/Scan (prefill "
                           "and step share the step graph)", control)
    if any("::" in op for op in unsupported):
        # ONNX shape inference stops at another domain's op: every tensor after it would be
        # reported with an unknown type and rank, burying the one real problem.
        return problems

    # Infer every type and shape afresh: converters (fp16) may leave stale value_info behind.
    del model.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as e:  # onnx raises InferenceError / ValidationError subclasses
        return problems + [f"ONNX shape inference failed: {e}"]
    types = _types(inferred)
    constants = {t.name for t in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output}

    no_rank: dict[str, list[str]] = {}
    bad_type: dict[str, list[str]] = {}
    not_const: dict[str, list[str]] = {}
    for node in model.graph.node:
        for out in node.output:
            if out and types.get(out, ("", None))[1] is None:
                no_rank.setdefault(node.op_type, []).append(node.name)
        data = _DATA_INPUT.get(node.op_type, 0)
        if node.op_type in TRT_OPS and data is not None and len(node.input) > data:
            dtype = types.get(node.input[data], ("?", None))[0]
            if dtype not in TRT_OPS[node.op_type]:
                bad_type.setdefault(f"{node.op_type} on {dtype}", []).append(node.name)
        idx = CONSTANT_INPUTS.get(node.op_type)
        if idx is not None and len(node.input) > idx and node.input[idx] and (
                node.input[idx] not in constants):
            not_const.setdefault(f"{node.op_type} input {idx}", []).append(node.name)
    problems += _summarise("{op}: output of unknown rank after shape inference (TensorRT needs "
                           "static ranks)", no_rank)
    problems += _summarise("{op}: type not accepted by TensorRT for this op", bad_type)
    problems += _summarise("{op} must be an initializer or Constant for TensorRT", not_const)
    doubles = sorted(n for n, (t, _) in types.items() if t == "float64")
    if doubles:
        problems.append(f"float64 tensors (TensorRT casts DOUBLE down): {doubles[:5]}")

    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for v in values:
            dtype, rank = types.get(v.name, ("?", None))
            if dtype not in IO_TYPES:
                problems.append(f"graph {kind} {v.name}: type {dtype} is not a TensorRT I/O type")
            if rank is None:
                problems.append(f"graph {kind} {v.name}: unknown rank")
            if kind == "input" and dtype == "int64" and v.name not in int64_inputs:
                problems.append(f"graph input {v.name} is int64; only {list(int64_inputs)} "
                                f"should be (tokens, positions, query_ticks)")
    if profile is not None:
        specs = [TensorSpec(v.name, "", tuple(
            d.dim_param if d.HasField("dim_param") else int(d.dim_value)
            for d in v.type.tensor_type.shape.dim)) for v in model.graph.input]
        problems += check_profile(profile, specs)
    return problems


def check_model(model_dir: str | Path, profile: Profile | None = None) -> list[str]:
    """The static check over every graph of an exported folder, under its default profile."""
    manifest = load_manifest(model_dir)
    profile = profile or default_profile(manifest)
    return [p for g in manifest.graphs().values()
            for p in check_tensorrt_compat(manifest.path(g), profile)]
