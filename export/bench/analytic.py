"""The analytic companion: what one decoder step must compute and move, and how fast it could be.

For a step graph (export/decoder.py `Decoder.step`) fed a chunk of n tokens per row after P
cached positions, with T audio frames, per layer:

    self-attention  wq wk wv wo          4 d^2 weights   QK^T and AV over P+n keys: 4 n (P+n) d
    SwiGLU (x2)     w1 w3 w2             3 d h each
    cross-attention wq wo                2 d^2 weights   (wk, wv live in the cross-K/V graph)
                                                          QK^T and AV over T frames: 4 n T d
    RMSNorm (x4)                         d each

then the final RMSNorm (d) and the LM head (d V; on the chunk's last position only). The token
embedding is a gather: n rows of it are read. FLOPs count multiply-adds as 2 and leave out the
elementwise work (norms, RoPE, SiLU, softmax), a few percent at these sizes.

Bytes: the weights a step reads (fp32: 4 per weight; int8: the quantized MatMul weights take 1
byte plus a per-output-channel scale and zero point, the LM head, norms and embedding stay
fp32), plus the K/V it reads: the self-attention cache (past and chunk) and the cross K/V.

The floor of a step is its weight bytes over the machine's copy bandwidth: a numpy copy of a
256 MB buffer, counting the bytes it moves (read + written; the convention of the issue's "a copy
moves about 22 GB/s"). At batch 1 a step cannot beat reading its weights once; a matrix-vector
product that only streams reads can run somewhat above a copy's rate (seen on the base preset).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from pianolm.export.decoder import DecoderConfig


@dataclass(frozen=True)
class StepParams:
    """Weights one step reads, by group (counts of parameters, not bytes)."""

    self_attention: int  # L * 4 d^2
    cross_attention: int  # L * 2 d^2 (queries and output projection)
    mlp: int  # L * 2 * 3 d h
    head: int  # d V
    norms: int  # (4 L + 1) d

    @property
    def matmul(self) -> int:
        """Every weight of a matrix product (the int8 export quantizes all but the head)."""
        return self.self_attention + self.cross_attention + self.mlp + self.head

    @property
    def total(self) -> int:
        return self.matmul + self.norms


def step_params(cfg: DecoderConfig) -> StepParams:
    L, d, h = cfg.n_layers, cfg.d_model, cfg.mlp_hidden  # noqa: N806
    return StepParams(self_attention=L * 4 * d * d, cross_attention=L * 2 * d * d,
                      mlp=L * 2 * 3 * d * h, head=d * cfg.vocab_size, norms=(4 * L + 1) * d)


@dataclass(frozen=True)
class StepCost:
    flops: int
    weight_bytes: int
    kv_bytes: int

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes


def weight_bytes(cfg: DecoderConfig, precision: str = "fp32", chunk: int = 1, batch: int = 1
                 ) -> int:
    p = step_params(cfg)
    embedding = batch * chunk * cfg.d_model * 4
    if precision == "fp32":
        return p.total * 4 + embedding
    if precision == "int8":
        quantized = p.matmul - p.head
        # per output channel: an fp32 scale and a uint8 zero point; one channel per weight column
        L, d, h = cfg.n_layers, cfg.d_model, cfg.mlp_hidden  # noqa: N806
        channels = L * (4 * d + 2 * d + 2 * (2 * h + d))
        return quantized + channels * 5 + (p.head + p.norms) * 4 + embedding
    raise ValueError(f"no byte count for precision {precision!r}")


def step_cost(cfg: DecoderConfig, *, chunk: int = 1, past: int = 0, frames: int = 501,
              batch: int = 1, precision: str = "fp32") -> StepCost:
    """FLOPs and bytes of one step of `batch` rows, each feeding `chunk` tokens after `past`."""
    p = step_params(cfg)
    L, d, n = cfg.n_layers, cfg.d_model, chunk  # noqa: N806
    body = p.self_attention + p.cross_attention + p.mlp
    flops = 2 * batch * n * body + 2 * batch * p.head
    flops += L * batch * 4 * n * (past + n) * d  # self-attention scores and mix
    flops += L * batch * 4 * n * frames * d  # cross-attention scores and mix
    kv_elem = 4 if precision in ("fp32", "int8") else 2
    kv = L * batch * 2 * ((past + n) + frames) * d * kv_elem
    return StepCost(flops, weight_bytes(cfg, precision, chunk, batch), kv)


def copy_bandwidth(megabytes: int = 256, repeats: int = 7) -> dict:
    """Bytes moved (read + written) per second by a numpy copy of a `megabytes` buffer: median
    (min, max) over repeats."""
    n = megabytes * 2**20
    src = np.ones(n, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        seconds.append(time.perf_counter() - t0)
    rates = sorted(2 * n / s for s in seconds)
    return {"bytes": n, "gb_per_s": round(float(np.median(rates)) / 1e9, 2),
            "min_gb_per_s": round(rates[0] / 1e9, 2), "max_gb_per_s": round(rates[-1] / 1e9, 2),
            "repeats": repeats}


def describe(cfg: DecoderConfig, frames: int, bandwidth_gb_s: float,
             pasts: tuple[int, ...] = (0, 100, 250, 500)) -> dict:
    """Per stage kind (1-token onset/flat steps, 3-token velocity/offset chunks) and precision:
    FLOPs, bytes and the bandwidth floor at batch 1, at a few past lengths."""
    out: dict = {"params": {**asdict(step_params(cfg)), "matmul": step_params(cfg).matmul,
                            "total": step_params(cfg).total},
                 "frames": frames, "bandwidth_gb_per_s": bandwidth_gb_s}
    for precision in ("fp32", "int8"):
        wb = weight_bytes(cfg, precision)
        out[precision] = {
            "weight_bytes": wb,
            "floor_ms": round(wb / (bandwidth_gb_s * 1e9) * 1e3, 3),
            "steps": [{"chunk": n, "past": p, **asdict(step_cost(
                cfg, chunk=n, past=p, frames=frames, precision=precision))}
                for n in (1, 3) for p in pasts],
        }
    return out
