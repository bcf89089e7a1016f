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

The floor of a step is the time the machine takes to stream its bytes once, read only: the
weights plus the K/V of a 1-token onset step at past 0 over the model's audio frames
(`FLOOR_PAST`; past 0 has the least K/V of any onset step, so the floor bounds every step of the
decode from below). At batch 1 a step cannot beat reading its weights and K/V once.

`stream_bandwidth` measures that rate in the same run, over a buffer of the step's own byte
count (fp32 and int8 separately: whether the bytes fit the last-level cache decides their rate,
as in the step itself), as a float32 matrix-vector product `W @ x`: it reads every byte of W
once, writes one float per 4 KB row, and numpy's BLAS runs it on every core, as ONNX Runtime runs
the step. Of the read-only passes timed over the small preset's fp32 and int8 step sizes it was
the fastest (the others: `np.max`, `np.dot(a, a)`, an integer `bitwise_or.reduce`, `np.sum`,
`np.count_nonzero`), so it is the tightest floor numpy can measure.

Reports written before this (no `floor` entry per precision; `bandwidth_gb_per_s` beside
`frames`) divided the weight bytes by a numpy copy's rate, read + written bytes counted, of a
256 MB buffer: a copy runs on one thread, and the 2-thread step beat that "floor".
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import asdict, dataclass

import numpy as np

from pianolm.export.decoder import DecoderConfig

from .measure import limit_threads

FLOOR_METHOD = "read-only stream of weight + K/V bytes"
FLOOR_PAST = 0  # the onset step the floor's K/V bytes are counted at (module docstring)
STREAM_COLUMNS = 1024  # W's row length in the stream: 4 KB rows


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


def stream_bandwidth(nbytes: int, repeats: int = 7, threads: int | None = None) -> dict:
    """Bytes read per second by one pass of `W @ x` over a float32 W of `nbytes` (rounded up to
    whole 4 KB rows; x cached): median (min, max) over `repeats` after one untimed pass. `threads`:
    numpy's BLAS threads (threadpoolctl, the bench extra; None or without it: BLAS's default,
    every core)."""
    rows = max(1, -(-nbytes // (4 * STREAM_COLUMNS)))
    w = np.ones((rows, STREAM_COLUMNS), dtype=np.float32)  # written: the pages are faulted in
    x = np.ones(STREAM_COLUMNS, dtype=np.float32)
    y = np.empty(rows, dtype=np.float32)
    applied = threads is not None and importlib.util.find_spec("threadpoolctl") is not None
    seconds = []
    with limit_threads(threads):
        np.matmul(w, x, out=y)
        for _ in range(repeats):
            t0 = time.perf_counter()
            np.matmul(w, x, out=y)
            seconds.append(time.perf_counter() - t0)
    seconds.sort()
    median = float(np.median(seconds))
    return {"how": f"float32 W @ x, W [{rows}, {STREAM_COLUMNS}]", "bytes": w.nbytes,
            "bytes_per_s": w.nbytes / median, "gb_per_s": round(w.nbytes / median / 1e9, 2),
            "min_gb_per_s": round(w.nbytes / seconds[-1] / 1e9, 2),
            "max_gb_per_s": round(w.nbytes / seconds[0] / 1e9, 2), "repeats": repeats,
            "blas_threads": threads if applied else "BLAS default"}


def step_floor(cfg: DecoderConfig, frames: int, precision: str = "fp32", repeats: int = 7,
               threads: int | None = None) -> dict:
    """The floor of a 1-token step at batch 1 (module docstring): the bytes it must read, the
    read-only stream measured over that many bytes now, and floor_ms = bytes / its rate."""
    cost = step_cost(cfg, chunk=1, past=FLOOR_PAST, frames=frames, precision=precision)
    stream = stream_bandwidth(cost.bytes, repeats, threads)
    return {"method": FLOOR_METHOD, "chunk": 1, "past": FLOOR_PAST, "frames": frames,
            "weight_bytes": cost.weight_bytes, "kv_bytes": cost.kv_bytes, "bytes": cost.bytes,
            "floor_ms": round(cost.bytes / stream["bytes_per_s"] * 1e3, 4), "stream": stream}


def describe(cfg: DecoderConfig, frames: int, repeats: int = 7, threads: int | None = None,
             pasts: tuple[int, ...] = (0, 100, 250, 500)) -> dict:
    """Per stage kind (1-token onset/flat steps, 3-token velocity/offset chunks) and precision:
    FLOPs and bytes at batch 1 at a few past lengths, and the floor (`step_floor`, measured)."""
    out: dict = {"params": {**asdict(step_params(cfg)), "matmul": step_params(cfg).matmul,
                            "total": step_params(cfg).total},
                 "frames": frames, "floor_method": FLOOR_METHOD}
    for precision in ("fp32", "int8"):
        floor = step_floor(cfg, frames, precision, repeats, threads)
        out[precision] = {
            "weight_bytes": weight_bytes(cfg, precision),
            "floor_ms": floor["floor_ms"],
            "floor": floor,
            "steps": [{"chunk": n, "past": p, **asdict(step_cost(
                cfg, chunk=n, past=p, frames=frames, precision=precision))}
                for n in (1, 3) for p in pasts],
        }
    return out
