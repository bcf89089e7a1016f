"""ONNX Runtime backend: runtime/backend.py's Backend / StageSession over an exported folder.

`OrtBackend(model_dir)` loads the manifest (runtime/manifest.py), opens one InferenceSession per
graph and checks each session's inputs and outputs against the manifest. `start(stage, emb)`
runs the stage's cross-KV graph once and returns an `OrtStageSession`, which feeds chunks to the
step graph and keeps the self-attention cache between calls.

Per-session state lives in two places only, so a CUDA variant with IO binding (cache kept on
the device as OrtValues) replaces `KVCache` and `OrtStageSession._run` and nothing else:
- `RowPositions` (runtime/backend.py): per-row real-token counts -> RoPE positions, and the
  key-mask history, shared with export/torch_backend.py so both backends follow one rule.
- `KVCache`: past K/V (grown by each step) and the segment's cross K/V.

Torch-free: numpy and onnxruntime only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import RowPositions, check_chunk
from .manifest import DecoderSpec, GraphSpec, Manifest, ManifestError, load_manifest

# ONNX Runtime's type strings for the manifest's dtypes
_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)",
              "int64": "tensor(int64)", "int32": "tensor(int32)", "bool": "tensor(bool)"}
_STEP_OUTPUTS = ["logits", "present_k", "present_v"]


@dataclass
class KVCache:
    """One session's attention state, as step-graph inputs: host arrays for the CPU backend."""

    past_k: np.ndarray  # [L, B, H, P, Dh]
    past_v: np.ndarray
    cross_k: np.ndarray  # [L, B, H, T, Dh], fixed for the segment
    cross_v: np.ndarray


class OrtStageSession:
    """One stage's decoder over one batch of segments (runtime/backend.py StageSession)."""

    def __init__(self, session: object, graph: GraphSpec, decoder: DecoderSpec,
                 cross_k: np.ndarray, cross_v: np.ndarray) -> None:
        self.session = session
        self.decoder = decoder
        self.batch = int(cross_k.shape[1])
        dtype = graph.input("past_k").dtype
        shape = (decoder.n_layers, self.batch, decoder.n_heads, 0, decoder.head_dim)
        self.cache = KVCache(np.zeros(shape, dtype), np.zeros(shape, dtype), cross_k, cross_v)
        self.rows = RowPositions.empty(self.batch)

    def step(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        tokens, mask = check_chunk(tokens, mask, self.batch)
        positions, key_mask = self.rows.advance(mask)
        if self.rows.counts.max(initial=0) > self.decoder.max_seq_len:
            raise ValueError(f"a row passed {self.decoder.max_seq_len} tokens, the longest "
                             f"sequence this model serves (decoder max_seq_len)")
        logits = self._run(tokens, positions, key_mask)
        return logits.astype(np.float32, copy=False)

    def _run(self, tokens: np.ndarray, positions: np.ndarray, key_mask: np.ndarray
             ) -> np.ndarray:
        c = self.cache
        logits, c.past_k, c.past_v = self.session.run(_STEP_OUTPUTS, {
            "tokens": tokens, "positions": positions, "key_mask": key_mask,
            "past_k": c.past_k, "past_v": c.past_v, "cross_k": c.cross_k,
            "cross_v": c.cross_v})
        return logits


class OrtBackend:
    """Backend protocol over an exported model folder, with ONNX Runtime.

    providers: ONNX Runtime execution providers (default CPU only).
    threads: intra-op threads per session (default: ONNX Runtime's choice, all cores).
    """

    def __init__(self, model_dir: str | Path, providers: Sequence[str] | None = None,
                 threads: int | None = None) -> None:
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
        self.sessions = {name: self._open(ort, options, name, graph)
                         for name, graph in self.manifest.graphs().items()}

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
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 2 or audio.shape[1] != self.segment_samples:
            raise ValueError(f"audio must be [B, {self.segment_samples}], got {audio.shape}")
        graph = self.manifest.encoder.graph
        (emb,) = self.sessions["encoder"].run(
            ["embeddings"], {"waveform": audio.astype(graph.input("waveform").dtype, copy=False)})
        return emb.astype(np.float32, copy=False)

    def start(self, stage: str, embeddings: np.ndarray) -> OrtStageSession:
        if stage not in self.stages:
            raise ValueError(f"stage {stage!r} not in this model's stages {list(self.stages)}")
        spec = self.manifest.stage(stage)
        emb = np.asarray(embeddings)
        if emb.ndim != 3 or emb.shape[2] != spec.decoder.enc_dim:
            raise ValueError(f"embeddings must be [B, T, {spec.decoder.enc_dim}], got "
                             f"{emb.shape}")
        dtype = spec.cross_kv.input("embeddings").dtype
        cross_k, cross_v = self.sessions[f"{stage}.cross_kv"].run(
            ["cross_k", "cross_v"], {"embeddings": emb.astype(dtype, copy=False)})
        return OrtStageSession(self.sessions[f"{stage}.step"], spec.step, spec.decoder,
                               cross_k, cross_v)
