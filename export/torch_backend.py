"""PyTorch implementations of `runtime/backend.py`'s Backend / StageSession.

- `TorchBackend(system, use_cache=True)`: cross K/V once per segment, self-attention KV cache,
  each step feeds only the new chunk. The reference for the exported graphs.
- `TorchBackend(system, use_cache=False)`: the authors' decode (`generate_in_batch`): no cache,
  every step re-runs the whole decoder, cross-attention on the audio included, over the full
  token history, and keeps the last logits. The baseline our runtime must beat, same tokens.

Both use the same semantics (runtime/backend.py): a False mask entry is padding, invisible to
every later token of its row, and does not advance the row's RoPE position counter.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from pianolm.export.decoder import Decoder
from pianolm.export.system import SEGMENT_SAMPLES, TranscriptionSystem
from pianolm.runtime.backend import RowPositions, check_chunk


class _Session:
    """What both sessions share: step reads the last position of `_feed`'s logits, step_all
    all of them; retract forgets rejected draft tokens (runtime/backend.py StageSession)."""

    rows: RowPositions

    def step(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.step_all(tokens, mask)[:, -1]

    def step_all(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self._feed(*check_chunk(tokens, mask, self.batch)).float().cpu().numpy()

    def retract(self, drop: np.ndarray) -> None:
        self.rows.retract(drop)

    def _feed(self, tokens: np.ndarray, mask: np.ndarray) -> Tensor:
        """A checked chunk -> logits [B, n, V] after each of its positions."""
        raise NotImplementedError


class CachedSession(_Session):
    """One stage over one batch, with a self-attention KV cache."""

    def __init__(self, decoder: Decoder, embeddings: Tensor) -> None:
        self.decoder = decoder
        self.batch = embeddings.shape[0]
        self.device = embeddings.device
        self.cross = decoder.cross_kv(embeddings)
        self.past = decoder.empty_cache(self.batch)
        self.rows = RowPositions.empty(self.batch)

    def retract(self, drop: np.ndarray) -> None:
        """As the runtime's host cache: positions every row drops leave the cache."""
        cut = self.rows.retract(drop, cut=True)
        if cut:
            self.past = [(k[:, :, :-cut], v[:, :, :-cut]) for k, v in self.past]

    def _feed(self, tokens: np.ndarray, mask: np.ndarray) -> Tensor:
        positions, key_mask = self.rows.advance(mask)
        ticks = _query_ticks(self.decoder, self.rows, tokens, mask)
        logits, self.past = self.decoder.step(
            *(torch.from_numpy(a).to(self.device) for a in (tokens, positions, key_mask)),
            self.past, self.cross,
            None if ticks is None else torch.from_numpy(ticks).to(self.device))
        return logits


def _query_ticks(decoder: Decoder, rows: RowPositions, tokens: np.ndarray, mask: np.ndarray
                 ) -> np.ndarray | None:
    """The chunk's query ticks for a time-aligned decoder (the runtime's rule), else None."""
    return rows.advance_ticks(tokens, mask) if decoder.cfg.time_aligned else None


class UncachedSession(_Session):
    """The authors' decode: keep the token history, re-run the full decoder every step."""

    def __init__(self, decoder: Decoder, embeddings: Tensor) -> None:
        self.decoder = decoder
        self.embeddings = embeddings
        self.batch = embeddings.shape[0]
        self.device = embeddings.device
        self.tokens = torch.zeros(self.batch, 0, dtype=torch.int64, device=self.device)
        self.positions = torch.zeros(self.batch, 0, dtype=torch.int64, device=self.device)
        self.ticks = torch.zeros(self.batch, 0, dtype=torch.int64, device=self.device)
        self.rows = RowPositions.empty(self.batch)

    def _feed(self, tokens: np.ndarray, mask: np.ndarray) -> Tensor:
        positions, key_mask = self.rows.advance(mask)
        ticks = _query_ticks(self.decoder, self.rows, tokens, mask)

        def grow(history: Tensor, chunk: np.ndarray) -> Tensor:
            return torch.cat([history, torch.from_numpy(chunk).to(self.device)], dim=1)

        self.tokens, self.positions = grow(self.tokens, tokens), grow(self.positions, positions)
        if ticks is not None:
            self.ticks = grow(self.ticks, ticks)
        logits = self.decoder(self.tokens, self.embeddings, positions=self.positions,
                              key_mask=torch.from_numpy(key_mask).to(self.device),
                              query_ticks=self.ticks if ticks is not None else None)
        return logits[:, -tokens.shape[1]:]


class TorchBackend:
    """Backend protocol on a TranscriptionSystem, float32, under torch.inference_mode."""

    sample_rate = 16000
    segment_samples = SEGMENT_SAMPLES

    def __init__(self, system: TranscriptionSystem, use_cache: bool = True) -> None:
        self.system = system.float().eval()
        self.use_cache = use_cache
        self.stages: tuple[str, ...] = system.stages
        self.device = next(system.decoders.parameters()).device
        # what an export's manifest would say (audio.input_peak): the Transcriber scales by it
        self.input_peak: float | None = getattr(system.encoder, "input_peak", None)
        # what the manifest's encoder.frames_per_second says: the end-aligned last segment's
        # start is rounded to whole frames (runtime/transcriber.py segment_align)
        self.frames_per_second = float(system.encoder.frames_per_second)

    @torch.inference_mode()
    def encode(self, audio: np.ndarray) -> np.ndarray:
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 2 or audio.shape[1] != self.segment_samples:
            raise ValueError(f"audio must be [B, {self.segment_samples}], got {audio.shape}")
        emb = self.system.embed(torch.from_numpy(audio).to(self.device))
        return emb.float().cpu().numpy()

    @torch.inference_mode()
    def start(self, stage: str, embeddings: np.ndarray) -> CachedSession | UncachedSession:
        if stage not in self.system.decoders:
            raise ValueError(f"stage {stage!r} not in this model's stages {list(self.stages)}")
        emb = torch.from_numpy(np.asarray(embeddings, dtype=np.float32)).to(self.device)
        decoder = self.system.decoders[stage]
        width = int(self.system.encoder.embed_dim)  # the decoder reads its own part of it
        if emb.ndim != 3 or emb.shape[2] != width:
            raise ValueError(f"embeddings must be [B, T, {width}], got {tuple(emb.shape)}")
        session_cls = CachedSession if self.use_cache else UncachedSession
        return session_cls(decoder, emb)
