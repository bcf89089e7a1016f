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

(runtime/graphs.py step_io). One step graph serves prefill (chunk > 1, past 0) and steps:
there is no If/Loop, every length comes from an input shape, past length 0 works. Dynamic axes
carry fixed names (batch, samples, frames, chunk, past, past_plus_chunk), shared across inputs
(every past key and value says "past").

Top to bottom: the export wrappers and their trace plans, exporting one graph, `export_model`,
and `pianolm export`. Deriving fp16 / int8 folders from an fp32 one is in precision.py
(torch-free), measuring parity (ONNX Runtime vs PyTorch) in parity.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch
from torch import Tensor, nn

from pianolm.export.decoder import CROSS_POSITIONS, KV, TIME_HEADS, CrossCache, Decoder
from pianolm.export.encoders import EncoderGraph
from pianolm.export.folder_encoder import FolderEncoder
from pianolm.export.precision import EXTERNAL_DATA_BYTES, convert_model, graph_spec
from pianolm.export.system import SEGMENT_SAMPLES, TranscriptionSystem
from pianolm.runtime import vocab
from pianolm.runtime.graphs import (
    ENCODER_PEDAL_IO,
    ENCODER_ROLLS_IO,
    cache_length_axis,
    cache_shape,
    cross_kv_io,
    cross_names,
    kv_names,
    step_io,
)
from pianolm.runtime.manifest import (
    DECODERS,
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
    load_manifest,
    write_manifest,
)
from pianolm.runtime.provenance import package_versions
from pianolm.runtime.rolls import ROLL_KEYS, RollDecodeConfig

log = logging.getLogger(__name__)

OPSET = 18
# Trace sizes: >= 2 and pairwise distinct on every dynamic axis, so the exporter neither
# specialises an axis to 0/1 nor unifies two axes that merely happen to be equal.
EX_BATCH, EX_CHUNK, EX_PAST, EX_FRAMES, EX_SAMPLES = 2, 3, 5, 7, 32000


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
    chunk, vocab] (after each of the chunk's tokens), per layer present K, V [batch, heads,
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
            CrossCache.from_tensors(caches[n:], cfg), ticks)
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
    graph = EncoderGraph(encoder)
    io = ENCODER_PEDAL_IO if graph.roll_keys != ROLL_KEYS else ENCODER_ROLLS_IO
    return _Plan(graph, (wave,), io, {"waveform": {0: "batch", 1: "samples"},
                                      "embeddings": frames, **{k: frames for k in io[1][1:]}})


def _cache_axes(names: Sequence[str], length: str) -> dict[str, dict[int, str]]:
    """Dynamic axes of per-layer caches (graphs.cache_length_axis says where the length is)."""
    return {name: {0: "batch", cache_length_axis(name): length} for name in names}


def _cross_plan(decoder: Decoder, embed_dim: int) -> _Plan:
    """embed_dim: the encoder's whole width (the decoder reads its part, enc_offset)."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(EX_BATCH, EX_FRAMES, embed_dim, generator=g)
    io = cross_kv_io(decoder.cfg.n_layers, decoder.pointer is not None,
                     decoder.prior is not None)
    return _Plan(CrossKVGraph(decoder), (emb,), io,
                 {"embeddings": {0: "batch", 1: "frames"}, **_cache_axes(io[1], "frames")})


def _step_plan(decoder: Decoder) -> _Plan:
    c = decoder.cfg
    g = torch.Generator().manual_seed(0)
    b, n, p, t = EX_BATCH, EX_CHUNK, EX_PAST, EX_FRAMES
    pointer, rolls = decoder.pointer is not None, decoder.prior is not None
    past = kv_names("past_key_values", c.n_layers)
    cross = cross_names(c.n_layers, pointer, rolls)
    caches = [torch.randn(cache_shape(name, b, c.n_heads, c.head_dim, length), generator=g)
              for names, length in ((past, p), (cross, t)) for name in names]
    ticks = (torch.randint(0, t * c.ticks_per_frame, (b, n), generator=g),) if c.time_aligned \
        else ()
    example = (torch.randint(0, c.vocab_size, (b, n), generator=g),
               torch.arange(p, p + n).expand(b, n).contiguous(),
               torch.ones(b, p + n, dtype=torch.bool), *ticks, *caches)
    io = step_io(c.n_layers, c.time_aligned, pointer, rolls)
    return _Plan(DecoderStepGraph(decoder), example, io, {
        "tokens": {0: "batch", 1: "chunk"}, "positions": {0: "batch", 1: "chunk"},
        "query_ticks": {0: "batch", 1: "chunk"},
        "key_mask": {0: "batch", 1: "past_plus_chunk"}, "logits": {0: "batch", 1: "chunk"},
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
        plain = dataclasses.is_dataclass(cfg) or isinstance(cfg, dict)
        out.update(_jsonable(cfg) if plain else {"repr": repr(cfg)})
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
                 external_data_bytes: int = EXTERNAL_DATA_BYTES,
                 source: SourceSpec | None = None) -> Manifest:
    """Export `system` into `out_dir` (graphs first, manifest.json last) and return the
    validated manifest.

    source_checkpoint: the checkpoint folder the weights came from (its hash goes into the
    manifest, its metadata's tuned roll thresholds into `encoder.rolls`); None marks a random
    initialisation (`seed` recorded if given). `source`, when given, is written as it is (weights
    converted from other files: export/importing.py).
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
                         external_data_bytes=external_data_bytes, source=source)
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
        return graph_spec(out / name, "fp32")

    if isinstance(enc, FolderEncoder):  # exists only as a graph: copied as it is
        encoder = enc.copy_into(out)
    else:
        encoder = _encoder_spec(enc, system.config.encoder,
                                roll_thresholds(source_checkpoint, metadata),
                                export(_encoder_plan(enc, example_samples), "encoder.onnx"))
    stages = []
    for stage, decoder in system.decoders.items():
        cfg = decoder.cfg
        stages.append(StageSpec(
            name=stage, task_token=vocab.TASK_TOKEN[stage],
            decoder=DecoderSpec(**{f.name: getattr(cfg, f.name)
                                   for f in dataclasses.fields(DecoderSpec)}),
            cross_kv=export(_cross_plan(decoder, int(enc.embed_dim)), f"{stage}_cross_kv.onnx"),
            step=export(_step_plan(decoder), f"{stage}_step.onnx")))

    if source is None and source_checkpoint is not None:
        from pianolm.export.checkpoint import checkpoint_hash

        source = SourceSpec(checkpoint=str(source_checkpoint),
                            sha256=checkpoint_hash(source_checkpoint), seed=seed,
                            metadata=_jsonable(metadata or {}))
    elif source is None:
        source = SourceSpec(random_init=True, seed=seed, metadata=_jsonable(metadata or {}))
    manifest = Manifest(precision="fp32", opset=opset, sample_rate=16000,
                        segment_samples=SEGMENT_SAMPLES, encoder=encoder, stages=tuple(stages),
                        source=source, versions=_versions(),
                        input_peak=getattr(system.encoder, "input_peak", None))
    write_manifest(manifest, out)
    return load_manifest(out)


def _encoder_spec(encoder: nn.Module, name: str, rolls: RollsSpec, graph: GraphSpec
                  ) -> EncoderSpec:
    """The manifest's `encoder` section for an exported encoder graph."""
    pedal = EncoderGraph(encoder).roll_keys != ROLL_KEYS
    return EncoderSpec(name=name, embed_dim=int(encoder.embed_dim),
                       frames_per_second=float(encoder.frames_per_second),
                       frames_per_segment=int(encoder.frames_per_segment),
                       config=_encoder_config(encoder), graph=graph,
                       rolls=replace(rolls, pedal=pedal),
                       parts=tuple(getattr(encoder, "part_widths", ())))


def export_rolls_model(encoder: nn.Module, name: str, out_dir: str | Path, rolls: RollsSpec,
                       source: SourceSpec, precision: str = "fp32", segmenting: str = "pianolm",
                       opset: int = OPSET, example_samples: int = EX_SAMPLES) -> Manifest:
    """A rolls-only model folder: the encoder graph alone (manifest without stages, default
    decoder "rolls"), e.g. a peer's encoder imported by `pianolm import`. Its notes come from
    the rolls, decoded as `rolls.thresholds` says; `segmenting` is how audio is cut
    (runtime/manifest.py SEGMENTINGS)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if precision != "fp32":
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-fp32-") as tmp:
            export_rolls_model(encoder, name, tmp, rolls, source, "fp32", segmenting, opset,
                               example_samples)
            return convert_model(tmp, out, precision)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # a half-written folder must not look complete
    encoder = encoder.float().eval()
    _export(_encoder_plan(encoder, example_samples), out / "encoder.onnx", opset,
            EXTERNAL_DATA_BYTES)
    spec = _encoder_spec(encoder, name, rolls, graph_spec(out / "encoder.onnx", "fp32"))
    manifest = Manifest(precision="fp32", opset=opset, sample_rate=16000,
                        segment_samples=SEGMENT_SAMPLES, encoder=spec, stages=(),
                        source=source, versions=_versions(), default_decoder="rolls",
                        input_peak=getattr(encoder, "input_peak", None), segmenting=segmenting)
    write_manifest(manifest, out)
    return load_manifest(out)


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
    ap.add_argument("--roll-prior", action="store_true", help="with --random-init: each "
                    "stage's roll prior (time positions, a pointer head, an hppnet encoder; "
                    "docs/decoder.md)")
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
                       "time_head": args.time_head, "roll_prior": args.roll_prior}
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
        from pianolm.export.parity import graph_parity  # it imports this module's wrappers

        worst = 0.0
        for p in graph_parity(system, args.out, batch=1, samples=EX_SAMPLES):
            print(f"  {p}")
            worst = max(worst, p.max_rel)
        print(f"max relative error {worst:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_export())
