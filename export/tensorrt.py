"""TensorRT: a static compatibility check of exported graphs, engine building, and the
equivalent trtexec / polygraphy command lines.

- `check_tensorrt_compat(onnx_path, profile)`: problems TensorRT's ONNX parser would hit, found
  without TensorRT: op types it lacks (table below), If/Loop/Scan (TensorRT cannot build an If
  that merges prefill and step), tensors of unknown rank after ONNX shape inference, data types
  an op does not take (int64 and bool are fine where the table lists them; no float64), inputs
  that must be initializers, and an inconsistent optimization profile.
- `build_engines(model_dir, profile, fp16)`: one `.engine` per graph with the TensorRT 10/11
  Python API (strongly typed networks, one optimization profile over batch / chunk / past /
  frames / samples). `tensorrt` is imported only here, lazily.
- `write_trtexec_commands(model_dir, profile)`: `trtexec.sh` and `polygraphy.sh` beside the
  graphs, always written (TensorRT cannot be installed on every machine that exports).

Input types (onnx-tensorrt 10.x, ModelImporter importInputs / convertDtype): INT64 inputs are
native TensorRT INT64 tensors (the parser warns "Make sure input tokens has Int64 binding"), and
BOOL inputs are kBOOL, so tokens/positions (int64) and key_mask (bool) need no change.

Torch-free: onnx and numpy only.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import onnx

from pianolm.runtime.manifest import (
    INT8_IS_ORT_ONLY,
    GraphSpec,
    Manifest,
    TensorSpec,
    load_manifest,
)

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
# Optimization profiles: dim name -> (min, opt, max)

Profile = dict[str, tuple[int, int, int]]
DERIVED = {"past_plus_chunk": ("past", "chunk")}  # key_mask / present length = past + chunk


def default_profile(manifest: Manifest) -> Profile:
    """Batch 1..32 (opt 8); chunks 1..4 (prefill is 2, velocity/offset steps 3); past 0 up to
    the RoPE table (max_seq_len - 4); frames and samples fixed to one 10 s segment."""
    max_seq = min(s.decoder.max_seq_len for s in manifest.stages)
    frames = manifest.encoder.frames_per_segment
    samples = manifest.segment_samples
    return {"batch": (1, 8, 32), "chunk": (1, 1, 4), "past": (0, 256, max_seq - 4),
            "frames": (frames, frames, frames), "samples": (samples, samples, samples)}


def _dim(profile: Profile, name: str) -> tuple[int, int, int]:
    if name in DERIVED:
        a, b = (_dim(profile, part) for part in DERIVED[name])
        return (a[0] + b[0], a[1] + b[1], a[2] + b[2])
    if name not in profile:
        raise KeyError(name)
    return profile[name]


def check_profile(profile: Profile, inputs: Iterable[TensorSpec] = ()) -> list[str]:
    """min <= opt <= max, sizes >= 0 (batch and chunk >= 1), derived dims given consistently,
    and every dynamic axis of `inputs` covered."""
    problems = []
    for name, value in profile.items():
        if len(value) != 3 or not all(isinstance(v, int) for v in value):
            problems.append(f"profile {name}: need (min, opt, max) ints, got {value!r}")
            continue
        lo, opt, hi = value
        floor = 1 if name in ("batch", "chunk", "frames", "samples") else 0
        if not floor <= lo <= opt <= hi:
            problems.append(f"profile {name}: need {floor} <= min <= opt <= max, got {value}")
    for name, parts in DERIVED.items():
        if name in profile and all(p in profile for p in parts):
            want = _dim({k: v for k, v in profile.items() if k != name}, name)
            if tuple(profile[name]) != want:
                problems.append(f"profile {name}: {profile[name]} != {' + '.join(parts)} "
                                f"{want}")
    for t in inputs:
        for d in t.shape:
            if isinstance(d, str):
                try:
                    _dim(profile, d)
                except KeyError:
                    problems.append(f"input {t.name}: axis {d!r} has no profile range")
    return problems


def input_shapes(inputs: Iterable[TensorSpec], profile: Profile
                 ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Every input's (min, opt, max) shape under the profile."""
    out = {}
    for t in inputs:
        ranges = [(d, d, d) if isinstance(d, int) else _dim(profile, d) for d in t.shape]
        out[t.name] = tuple(tuple(r[i] for r in ranges) for i in range(3))
    return out  # type: ignore[return-value]


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


# ---------------------------------------------------------------------------------------------
# trtexec / polygraphy command lines


def _engine_name(graph: GraphSpec) -> str:
    return Path(graph.file).with_suffix(".engine").name


def _trtexec_shapes(shapes: dict[str, tuple], which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in s[which])}" for name, s in shapes.items())


def _polygraphy_shapes(shapes: dict[str, tuple], which: int) -> list[str]:
    return [f"{name}:[{','.join(str(d) for d in s[which])}]" for name, s in shapes.items()]


def _command(lines: list[list[str]]) -> str:
    """One shell command, a continuation line per group of words."""
    return " \\\n    ".join(" ".join(shlex.quote(w) for w in words) for words in lines) + "\n"


def write_trtexec_commands(model_dir: str | Path, profile: Profile | None = None,
                           fp16: bool = False) -> tuple[Path, Path]:
    """Write `trtexec.sh` (one engine build per graph) and `polygraphy.sh` (ONNX Runtime vs
    TensorRT on random inputs, per graph) into the model folder; returns their paths."""
    manifest = load_manifest(model_dir)
    profile = profile or default_profile(manifest)
    folder = Path(model_dir)
    weak_fp16 = fp16 and manifest.precision == "fp32"
    head = ["#!/usr/bin/env bash", "# Written by `pianolm build-engines`; run from anywhere.",
            "set -euo pipefail", 'cd "$(dirname "$0")"', ""]
    trt = list(head)
    if weak_fp16:
        trt.append("# --fp16 on an fp32 export: TensorRT 10 only (11 removed it; export with "
                   "--precision fp16 instead)")
    poly = list(head)
    max_pos = min(s.decoder.max_seq_len for s in manifest.stages) - 1
    for graph in manifest.graphs().values():
        shapes = input_shapes(graph.inputs, profile)
        trt.append(_command([
            ["trtexec", f"--onnx={graph.file}", f"--saveEngine={_engine_name(graph)}",
             "--fp16" if weak_fp16 else "--stronglyTyped"],
            [f"--minShapes={_trtexec_shapes(shapes, 0)}"],
            [f"--optShapes={_trtexec_shapes(shapes, 1)}"],
            [f"--maxShapes={_trtexec_shapes(shapes, 2)}"]]))
        ranges = {"tokens": f"tokens:[0,{manifest.vocab['vocab_size'] - 1}]",
                  "positions": f"positions:[0,{max_pos}]",
                  "query_ticks": f"query_ticks:[0,{manifest.vocab['segment_ticks']}]"}
        pcmd = [["polygraphy", "run", graph.file, "--onnxrt", "--trt",
                 "--fp16" if weak_fp16 else "--strongly-typed"],
                ["--trt-min-shapes", *_polygraphy_shapes(shapes, 0)],
                ["--trt-opt-shapes", *_polygraphy_shapes(shapes, 1)],
                ["--trt-max-shapes", *_polygraphy_shapes(shapes, 2)],
                ["--input-shapes", *_polygraphy_shapes(shapes, 1)]]
        vals = [ranges[t.name] for t in graph.inputs if t.name in ranges]
        if vals:
            pcmd.append(["--val-range", *vals])
        tol = "1e-2" if fp16 or graph.precision == "fp16" else "1e-3"
        pcmd.append(["--atol", tol, "--rtol", tol])
        poly.append(_command(pcmd))
    paths = (folder / "trtexec.sh", folder / "polygraphy.sh")
    for path, lines in zip(paths, (trt, poly)):
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o755)
    return paths


# ---------------------------------------------------------------------------------------------
# Building engines with the TensorRT Python API


class TensorRTUnavailable(RuntimeError):
    """`import tensorrt` failed; the message says what to install."""


INSTALL_HINT = ("TensorRT's Python API is not importable here. Install it from NVIDIA's index "
                "on a machine with an NVIDIA GPU: `pip install --extra-index-url "
                "https://pypi.nvidia.com tensorrt-cu12` (or tensorrt-cu13; TensorRT 10.x or "
                "11.x). Without it, run the trtexec.sh written into the model folder where "
                "trtexec is installed.")


def _import_tensorrt():  # noqa: ANN202 (the module)
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or OSError from missing CUDA libraries
        raise TensorRTUnavailable(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from None
    return trt


def build_engines(model_dir: str | Path, profile: Profile | None = None, fp16: bool = False,
                  out_dir: str | Path | None = None) -> dict[str, Path]:
    """Build one serialized engine per graph; returns graph name -> engine path.

    Networks are strongly typed where TensorRT offers it (10.x, 11.x): the ONNX types decide
    the precision, so an fp16 engine comes from an fp16 export. `fp16=True` on an fp32 export
    uses BuilderFlag.FP16 on a weakly typed network, which only TensorRT 10 still has.
    """
    trt = _import_tensorrt()
    manifest = load_manifest(model_dir)
    if manifest.precision == "int8":
        raise ValueError(f"{model_dir}: {INT8_IS_ORT_ONLY}; build from the fp16 or fp32 "
                         f"export")
    profile = profile or default_profile(manifest)
    problems = check_profile(profile, [t for g in manifest.graphs().values() for t in g.inputs])
    if problems:
        raise ValueError("; ".join(problems))
    strongly = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    weak_fp16 = fp16 and manifest.precision == "fp32"
    if weak_fp16 and not hasattr(trt.BuilderFlag, "FP16"):
        raise ValueError(f"TensorRT {trt.__version__} has no BuilderFlag.FP16 (networks are "
                         f"strongly typed): export with --precision fp16 and build from that")
    out = Path(out_dir or model_dir)
    out.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    engines: dict[str, Path] = {}
    for name, graph in manifest.graphs().items():
        flags = 0
        if strongly and not weak_fp16:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        # parse_from_file resolves external data beside the graph
        if not parser.parse_from_file(str(manifest.path(graph))):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise RuntimeError(f"{graph.file}: TensorRT cannot parse it: {errors}")
        config = builder.create_builder_config()
        if weak_fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        shapes = input_shapes(graph.inputs, profile)
        opt_profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            lo, opt, hi = shapes[tensor.name]
            opt_profile.set_shape(tensor.name, lo, opt, hi)
        config.add_optimization_profile(opt_profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"{graph.file}: TensorRT failed to build an engine (see its log)")
        path = out / _engine_name(graph)
        with path.open("wb") as fh:
            fh.write(serialized)
        engines[name] = path
    (out / "tensorrt.json").write_text(json.dumps({
        "tensorrt": trt.__version__, "strongly_typed": strongly and not weak_fp16,
        "fp16_flag": weak_fp16, "profile": {k: list(v) for k, v in profile.items()},
        "engines": {k: v.name for k, v in engines.items()}}, indent=2) + "\n")
    return engines


# ---------------------------------------------------------------------------------------------
# `pianolm build-engines`


def _range(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.split("/"))
    except ValueError:
        parts = ()
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected MIN/OPT/MAX (or one size), got {text!r}")
    return parts  # type: ignore[return-value]


def main_build_engines(argv: Sequence[str] | None = None) -> int:
    """`pianolm build-engines DIR`: TensorRT engines + trtexec/polygraphy scripts."""
    ap = argparse.ArgumentParser(
        prog="pianolm build-engines",
        description="Check an exported folder for TensorRT, write trtexec.sh and polygraphy.sh "
                    "into it, and build .engine files with the TensorRT Python API.")
    ap.add_argument("model_dir", help="an exported model folder (pianolm export)")
    for dim, what in (("batch", "segments per batch"), ("chunk", "tokens per step"),
                      ("past", "cached tokens"), ("frames", "encoder frames per segment"),
                      ("samples", "waveform samples")):
        ap.add_argument(f"--{dim}", type=_range, metavar="MIN/OPT/MAX",
                        help=f"profile range of {what} (default: see docs/manifest.md)")
    ap.add_argument("--fp16", action="store_true",
                    help="fp16 engines from an fp32 export (TensorRT 10 only); an fp16 export "
                         "builds fp16 engines without it")
    ap.add_argument("--commands-only", action="store_true",
                    help="write trtexec.sh / polygraphy.sh and run the check; build nothing")
    args = ap.parse_args(argv)
    try:
        manifest = load_manifest(args.model_dir)
    except ValueError as e:
        print(f"pianolm build-engines: error: {e}", file=sys.stderr)
        return 2
    if manifest.precision == "int8":
        print(f"pianolm build-engines: error: {args.model_dir}: {INT8_IS_ORT_ONLY}; export "
              f"fp16 or fp32 for TensorRT", file=sys.stderr)
        return 2
    profile = default_profile(manifest)
    for dim in ("batch", "chunk", "past", "frames", "samples"):
        if getattr(args, dim):
            profile[dim] = getattr(args, dim)
    bad = check_profile(profile)
    if bad:
        print(f"pianolm build-engines: error: {'; '.join(bad)}", file=sys.stderr)
        return 2
    problems = check_model(args.model_dir, profile)
    for p in problems:
        print(f"TensorRT check: {p}")
    if not problems:
        print(f"TensorRT check: {len(manifest.graphs())} graphs ok")
    scripts = write_trtexec_commands(args.model_dir, profile, args.fp16)
    print(f"wrote {scripts[0]} and {scripts[1]}")
    if args.commands_only:
        return 1 if problems else 0
    try:
        engines = build_engines(args.model_dir, profile, args.fp16)
    except TensorRTUnavailable as e:
        print(f"pianolm build-engines: {e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as e:
        print(f"pianolm build-engines: error: {e}", file=sys.stderr)
        return 2
    for name, path in engines.items():
        print(f"  {name:<18} {path.name} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_build_engines())
