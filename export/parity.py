"""Graph parity: every graph of an exported folder run in ONNX Runtime (CPU) against its
PyTorch module on the same fresh random inputs, every output compared (`graph_parity`, behind
`pianolm export --verify` and the export tests).

Top to bottom: `Parity`, one output's error; `random_step_inputs`, step-graph inputs as the
decode loop makes them (torch-free, also used by benchmarks/int8_variants.py); `graph_parity`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pianolm.export.encoders import EncoderGraph
from pianolm.export.onnx_export import CrossKVGraph, DecoderStepGraph
from pianolm.export.system import TranscriptionSystem
from pianolm.runtime.backend import RowPositions
from pianolm.runtime.graphs import cache_shape
from pianolm.runtime.manifest import GraphSpec, load_manifest


@dataclass(frozen=True)
class Parity:
    """One graph output compared: max |ort - torch|, that over max |torch| (the scale)."""

    graph: str
    output: str
    batch: int
    max_abs: float
    max_rel: float
    scale: float

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
        emb = rng.normal(size=(batch, frames, manifest.encoder.embed_dim)).astype(np.float32)
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
            out.append(Parity(name, spec.name, batch, err, err / max(scale, 1e-30), scale))
    return out
