"""ONNX Runtime backend: runtime/backend.py's Backend / StageSession over an exported folder.

`OrtBackend(model_dir)` loads the manifest (runtime/manifest.py), opens one InferenceSession per
graph and checks each session's inputs and outputs against the manifest. `start(stage, emb)`
runs the stage's cross-KV graph once and returns an `OrtStageSession`, which feeds chunks to
the step graph and keeps the self-attention cache between calls: runtime/step_session.py's
StepSession (the bookkeeping every step-graph backend shares) over its host KVCache, with the
step run by `InferenceSession.run`.

Torch-free: numpy and onnxruntime only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .backend import check_audio, check_embeddings
from .manifest import (
    GraphSpec,
    Manifest,
    ManifestError,
    check_graph,
    load_manifest,
)
from .step_session import KVCache, StepSession, empty_past

# ONNX Runtime's type strings for the manifest's dtypes
_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)",
              "int64": "tensor(int64)", "int32": "tensor(int32)", "bool": "tensor(bool)"}


class OrtStageSession(StepSession):
    """StepSession on an ONNX Runtime InferenceSession over host arrays (KVCache)."""

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """feeds: the host inputs (DecoderSpec.step_inputs) -> logits; the cache moves on."""
        c, d = self.cache, self.decoder
        logits, *c.past = self.session.run(
            ["logits", *d.present_names],
            {**feeds, **dict(zip(d.past_names, c.past)), **dict(zip(d.cross_names, c.cross))})
        return logits


class OrtBackend:
    """Backend protocol over an exported model folder, with ONNX Runtime.

    providers: ONNX Runtime execution providers, names or (name, options) pairs (default CPU
        only).
    threads: intra-op threads per session (default: ONNX Runtime's choice, all cores).
    """

    def __init__(self, model_dir: str | Path,
                 providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
                 threads: int | None = None, graphs: Sequence[str] | None = None,
                 verify: bool | None = None) -> None:
        """graphs: the manifest's graph names to open (None: all; the rolls decoder needs only
        "encoder", so a missing LM graph cannot block it). verify: sha256 every graph opened
        (None: those up to manifest.HASH_ON_LOAD_BYTES; sizes are always checked)."""
        import onnxruntime as ort

        self.manifest: Manifest = load_manifest(model_dir)
        self.stages: tuple[str, ...] = self.manifest.stage_names
        self.sample_rate = self.manifest.sample_rate
        self.segment_samples = self.manifest.segment_samples
        self.precision = self.manifest.precision
        self.providers = list(providers or ["CPUExecutionProvider"])
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        wanted = self.manifest.graphs() if graphs is None else {
            name: self.manifest.graphs()[name] for name in graphs}
        for name in wanted:
            check_graph(self.manifest, name, verify)
        self.sessions = {name: self._open(ort, options, name, graph)
                         for name, graph in wanted.items()}

    def _open(self, ort: object, options: object, name: str, graph: GraphSpec) -> object:
        path = self.manifest.path(graph)
        try:
            session = ort.InferenceSession(str(path), options, providers=self.providers)
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise ManifestError(f"{path}: ONNX Runtime cannot load graph {name}: {e}") from e
        for kind, specs, actual in (("input", graph.inputs, session.get_inputs()),
                                    ("output", graph.outputs, session.get_outputs())):
            got = [(a.name, a.type) for a in actual]
            want = [(t.name, _ORT_TYPES[t.dtype]) for t in specs]
            if got != want:
                raise ManifestError(f"{path}: graph {kind}s {got} do not match the manifest's "
                                    f"{want} (graph {name})")
        return session

    def encode(self, audio: np.ndarray) -> np.ndarray:
        """float32 waveform [B, segment_samples] -> embeddings [B, T, E] float32."""
        return self._encode(audio, with_rolls=False)[0]

    def encode_with_rolls(self, audio: np.ndarray, whole: bool = True
                          ) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        """`encode`, plus the encoder's piano rolls from the same run: {onset, offset, frame,
        velocity: float32 [B, T, 88]}, with pedal_onset/offset/frame [B, T, 1] where the encoder has
        a pedal model, or None when the model's encoder has no roll outputs
        (format-1 folders). whole=False: a window shorter than a segment (live streaming's
        --window; the encoder graph's samples axis is dynamic)."""
        return self._encode(audio, with_rolls=True, whole=whole)

    def _encode(self, audio: np.ndarray, with_rolls: bool, whole: bool = True
                ) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        audio = check_audio(audio, self.segment_samples, whole)
        graph = self.manifest.encoder.graph
        rolls_spec = self.manifest.encoder.rolls
        keys = list(rolls_spec.outputs) if with_rolls and rolls_spec else []
        emb, *rolls = self.sessions["encoder"].run(
            ["embeddings", *keys],
            {"waveform": audio.astype(graph.input("waveform").dtype, copy=False)})
        return (emb.astype(np.float32, copy=False),
                {k: r.astype(np.float32, copy=False) for k, r in zip(keys, rolls)} if keys
                else None)

    def start(self, stage: str, embeddings: np.ndarray) -> OrtStageSession:
        spec, emb = check_embeddings(self.manifest, stage, embeddings)
        cross = self.sessions[f"{stage}.cross_kv"].run(list(spec.decoder.cross_names),
                                                        {"embeddings": emb})
        return OrtStageSession(self.sessions[f"{stage}.step"], spec,
                               KVCache(empty_past(spec.step, spec.decoder, len(emb)), cross))
