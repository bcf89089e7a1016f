"""Building TensorRT engines, torch-free and onnx-free: what `pianolm build-engines` runs on the
GPU server (an engine only loads under the TensorRT version and GPU that built it).

- Optimization profiles (`Profile`, `default_profile`, `check_profile`, `input_shapes`): dim
  name -> (min, opt, max), `past_plus_chunk` derived from past + chunk.
- `engine_file(graph)`: the one naming rule for engine files (onset_step.onnx ->
  onset_step.engine); runtime/trt_backend.py finds engines by it.
- `write_trtexec_commands(model_dir, profile)`: `trtexec.sh` and `polygraphy.sh` beside the
  graphs, always written (TensorRT cannot be installed on every machine).
- `build_engines(model_dir, profile, fp16)`: one `.engine` per graph with the TensorRT 10/11
  Python API (strongly typed networks, one optimization profile over batch / chunk / past /
  frames / samples), and `tensorrt.json` recording the version and profile. `tensorrt` is
  imported only there, lazily.
- `main_build_engines`: the `pianolm build-engines` command. It runs the static ONNX check
  (export/tensorrt.py, `check_model`) where onnx is importable, and says it skipped it where
  not (a GPU server with `pianolm[gpu]` and TensorRT only).

Imports: the standard library and pianolm.runtime.manifest only (no torch, no onnx).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from pianolm.runtime.manifest import (
    INT8_IS_ORT_ONLY,
    GraphSpec,
    Manifest,
    TensorSpec,
    load_manifest,
)

# ---------------------------------------------------------------------------------------------
# Files: the one naming rule (runtime/trt_backend.py loads engines by it)

BUILD_RECORD = "tensorrt.json"  # written by build_engines beside the engines


def engine_file(graph: GraphSpec) -> str:
    """The engine `pianolm build-engines` writes for a graph: its file name with .engine."""
    return Path(graph.file).with_suffix(".engine").name


# ---------------------------------------------------------------------------------------------
# Optimization profiles: dim name -> (min, opt, max)

Profile = dict[str, tuple[int, int, int]]
DERIVED = {"past_plus_chunk": ("past", "chunk")}  # key_mask / present length = past + chunk


def default_profile(manifest: Manifest) -> Profile:
    """Batch 1..32 (opt 8); chunks 1..4 (prefill is 2, velocity/offset steps 3); past 0 up to
    the RoPE table (max_seq_len - 4); frames and samples fixed to one 10 s segment. A rolls-only
    model (no stages) has no chunk or past axis."""
    frames = manifest.encoder.frames_per_segment
    samples = manifest.segment_samples
    decoder: Profile = {}
    if manifest.stages:
        max_seq = min(s.decoder.max_seq_len for s in manifest.stages)
        decoder = {"chunk": (1, 1, 4), "past": (0, 256, max_seq - 4)}
    return {"batch": (1, 8, 32), **decoder, "frames": (frames, frames, frames),
            "samples": (samples, samples, samples)}


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
# trtexec / polygraphy command lines


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
    max_pos = min((s.decoder.max_seq_len for s in manifest.stages), default=1) - 1
    for graph in manifest.graphs().values():
        shapes = input_shapes(graph.inputs, profile)
        trt.append(_command([
            ["trtexec", f"--onnx={graph.file}", f"--saveEngine={engine_file(graph)}",
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


INSTALL_HINT = ("TensorRT's Python API is not importable here. On the machine with the NVIDIA "
                "GPU that will run the engines: `pip install 'pianolm[gpu]'` and TensorRT from "
                "NVIDIA's index, `pip install --extra-index-url https://pypi.nvidia.com "
                "tensorrt-cu12` (or tensorrt-cu13; TensorRT 10.x or 11.x). Without it, run the "
                "trtexec.sh written into the model folder where trtexec is installed.")


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
        path = out / engine_file(graph)
        with path.open("wb") as fh:
            fh.write(serialized)
        engines[name] = path
    (out / BUILD_RECORD).write_text(json.dumps({
        "tensorrt": trt.__version__, "strongly_typed": strongly and not weak_fp16,
        "fp16_flag": weak_fp16, "profile": {k: list(v) for k, v in profile.items()},
        "engines": {k: v.name for k, v in engines.items()}}, indent=2) + "\n")
    return engines


# ---------------------------------------------------------------------------------------------
# `pianolm build-engines`

CHECK_SKIPPED = ("TensorRT check: skipped (needs onnx, not installed here: pip install "
                 "'pianolm[export]', or run `pianolm build-engines {model_dir} --commands-only` "
                 "where the model was exported)")


def static_check(model_dir: str | Path, profile: Profile) -> list[str] | None:
    """export/tensorrt.py's static check of every graph, or None where onnx is not importable
    (a torch-free GPU server: the check is optional, the build is not)."""
    try:
        from pianolm.export.tensorrt import check_model
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "onnx":
            raise
        return None
    return check_model(model_dir, profile)


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
        description="Check an exported folder for TensorRT (where onnx is installed), write "
                    "trtexec.sh and polygraphy.sh into it, and build .engine files with the "
                    "TensorRT Python API.")
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
                    help="write trtexec.sh / polygraphy.sh and run the check (where onnx is "
                         "installed); build nothing")
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
    checked = static_check(args.model_dir, profile)
    problems = checked or []
    if checked is None:
        print(CHECK_SKIPPED.format(model_dir=args.model_dir))
    for p in problems:
        print(f"TensorRT check: {p}")
    if checked == []:
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
