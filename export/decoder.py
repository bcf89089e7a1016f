"""The LLaMA-style note decoder (docs/model.md, "Decoders").

One file, nanoGPT / lit-llama style. Each block is

    x = x + SelfAttn(RMSNorm(x))    causal, RoPE on q and k
    x = x + SwiGLU(RMSNorm(x))
    x = x + CrossAttn(RMSNorm(x))   to the audio frames
    x = x + SwiGLU(RMSNorm(x))

then a final RMSNorm and an untied LM head. The audio side is
`Linear(enc_dim -> d)(emb) + Linear(64 -> d)(sinusoidal absolute PE)`.

Cross-attention positions (`DecoderConfig.cross_positions`, docs/decoder.md):
- "token", the authors' layout: queries rotated by the token's index, keys carry only the
  absolute frame PE, so which frame a time token means must be learned from data.
- "time": queries AND keys rotated in 10 ms ticks: a key at its frame's tick, a query at the
  tick of the latest time token at or before it (`vocab.query_ticks`), so q.k peaks where
  the token's time and the frame's time agree from the first step. Two priors build on it:
  `look_ahead` (a query at tick q sees frames from q - 2 ticks on, each head with a decay
  ahead) and `time_head="pointer"` (the time-token logits are scores of a pointer query
  against time-rotated pointer keys of the frames; the LM head keeps the other tokens).

Two ways in:
- `forward(tokens, audio_emb)`: training / the authors' full-prefix decode.
- `cross_kv(audio_emb)` once per segment, then `step(...)` per chunk with an explicit KV cache.
  `step` is what gets exported to ONNX: no Python branching on tensor values, every length comes
  from an input shape, and past length 0 works (prefill and steps are one graph).

Caches are per layer, a list of (K, V) pairs, never one stacked tensor: in ONNX Runtime taking
layer i out of a stacked input is a copy of all of it, every step. The cross-attention K is kept
transposed, [B, H, Dh, T], so q K^T reads it as it is instead of transposing it every step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pianolm.runtime import vocab

from .roll_prior import STAGES as PRIOR_STAGES
from .roll_prior import RollPrior, features

KV = tuple[Tensor, Tensor]  # one layer's cache: (K, V)

CROSS_POSITIONS = ("token", "time")
TIME_HEADS = ("lm", "pointer")
CARRIED = ("after", "separate")  # where the offset stage decodes carried notes
# look-ahead prior (docs/decoder.md): frames more than this many ticks before the query's tick
# are masked, and head h's score falls by slope_h per 100 ticks ahead (initial slopes, cycled
# over the heads; learnable per layer and head)
LOOK_AHEAD_MARGIN = 2
LOOK_AHEAD_SLOPES = (0.0, 5.0, 25.0)
MASKED = -1e4  # an additive score that removes a frame (finite: fp16-safe, never NaN)

# name -> (n_layers, d_model, n_heads)
PRESETS: dict[str, tuple[int, int, int]] = {
    "base": (6, 1024, 16),  # authors' main size, ~160 M per stage
    "small": (4, 512, 8),  # authors' small size, ~30 M per stage
    # CPU-trainable: 2 layers, d 256, head_dim 64 like the bigger presets; ~4.4 M per stage
    # (crnn), 6.5x fewer than small, so three stages train on a laptop-class CPU. The paper finds
    # the encoder matters far more than LM size, and the encoder here already gives a roll.
    "tiny": (2, 256, 4),
    # The shipped default's size: 2 layers, d 192, ~2.3 M per stage (hppnet), so the whole
    # system fits the package's 40 MB budget in fp32 (its size: README, "The default model")
    # and trains in CPU hours.
    "mini": (2, 192, 3),
}


@dataclass(frozen=True)
class DecoderConfig:
    n_layers: int
    d_model: int
    n_heads: int
    enc_dim: int  # width of the encoder's frame embeddings (crnn 1536, hppnet 352)
    vocab_size: int = vocab.VOCAB_SIZE
    max_seq_len: int = 2048  # size of the RoPE table: the longest token sequence served
    audio_pe_dim: int = 64
    max_frames: int = 1024  # size of the audio PE table: the most frames per segment
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    cross_positions: str = "token"  # "token" (the authors') | "time" (see the module doc)
    look_ahead: bool = False  # time only
    time_head: str = "lm"  # "lm" | "pointer" (time only)
    ticks_per_frame: int = 2  # 10 ms ticks per encoder frame: hppnet (50 fps) 2, crnn 1
    # The decoder reads embeddings[..., enc_offset : enc_offset + enc_dim]: stages that read
    # different encoders share one concatenated embedding (export/stage_encoders.py)
    enc_offset: int = 0
    # Offset stage: the notes carried from the previous segment come after the segment's own
    # in one sequence ("after") or in a sequence of their own ("separate", the authors'
    # layout); a decoding choice the manifest carries (runtime/decode.py)
    carried: str = "after"
    # The stage whose roll evidence is added to its logits (export/roll_prior.py): "onset",
    # "velocity" or "offset"; "none" for no prior. Needs "time" positions, a pointer time head
    # and embeddings that are the four rolls (4 x 88)
    roll_prior: str = "none"

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if self.head_dim % 2 or self.audio_pe_dim % 2:
            raise ValueError("head_dim and audio_pe_dim must be even (RoPE / sin-cos pairs)")
        if self.cross_positions not in CROSS_POSITIONS:
            raise ValueError(f"cross_positions {self.cross_positions!r}: choose from "
                             f"{list(CROSS_POSITIONS)}")
        if self.time_head not in TIME_HEADS:
            raise ValueError(f"time_head {self.time_head!r}: choose from {list(TIME_HEADS)}")
        if (self.look_ahead or self.time_head == "pointer") and not self.time_aligned:
            raise ValueError("look_ahead and time_head='pointer' need cross_positions='time'")
        if self.ticks_per_frame < 1:
            raise ValueError(f"ticks_per_frame must be >= 1, got {self.ticks_per_frame}")
        if self.enc_offset < 0:
            raise ValueError(f"enc_offset must be >= 0, got {self.enc_offset}")
        if self.carried not in CARRIED:
            raise ValueError(f"carried {self.carried!r}: choose from {list(CARRIED)}")
        if self.roll_prior not in ("none", *PRIOR_STAGES):
            raise ValueError(f"roll_prior {self.roll_prior!r}: choose from "
                             f"{['none', *PRIOR_STAGES]}")
        if self.roll_prior != "none" and (
                not self.time_aligned or self.enc_dim != 4 * vocab.NUM_PITCHES
                or (self.roll_prior != "velocity" and self.time_head != "pointer")):
            raise ValueError("roll_prior needs cross_positions='time', embeddings that are the "
                             f"four rolls ({4 * vocab.NUM_PITCHES}-d, not {self.enc_dim}-d), "
                             "and for the onset and offset stages time_head='pointer'")
        if self.time_aligned and self.max_seq_len <= vocab.SEGMENT_TICKS:
            raise ValueError(f"cross_positions='time' rotates by tick: max_seq_len (the RoPE "
                             f"table) must exceed {vocab.SEGMENT_TICKS}")

    @property
    def time_aligned(self) -> bool:
        return self.cross_positions == "time"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        # SwiGLU keeps the parameter count of a 4d MLP: 2/3 * 4d, rounded UP to a multiple of 256
        hidden = -(-8 * self.d_model // 3)  # ceil(8d/3)
        return -(-hidden // 256) * 256

    @classmethod
    def from_preset(cls, name: str, enc_dim: int, **overrides: object) -> DecoderConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown decoder preset {name!r}; choose from {sorted(PRESETS)}")
        n_layers, d_model, n_heads = PRESETS[name]
        return cls(n_layers=n_layers, d_model=d_model, n_heads=n_heads, enc_dim=enc_dim,
                   **overrides)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> DecoderConfig:
        """Strict: unknown or missing required keys raise (checkpoint.py names the file)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown decoder config field(s) {unknown}")
        wanted = {"float": (int, float), "int": int, "str": str, "bool": bool}
        for f in fields(cls):  # JSON gives no types: 512.0 or "512" must not slip through
            if f.name not in d:
                continue
            v = d[f.name]
            if (isinstance(v, bool) and f.type != "bool") or not isinstance(v, wanted[f.type]):
                raise ValueError(f"field {f.name!r} must be {f.type}, got {v!r}")
        return cls(**d)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Position tables


def rope_table(max_len: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin [max_len, head_dim] for rotate-half RoPE (GPT-NeoX layout)."""
    # explicit CPU: stays real even when the model is built under `with torch.device("meta")`
    f64 = {"dtype": torch.float64, "device": "cpu"}
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, **f64) / head_dim))
    angles = torch.arange(max_len, **f64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def sinusoidal_table(max_len: int, dim: int) -> Tensor:
    """[max_len, dim] absolute sin/cos position encoding (Vaswani et al.), sin/cos interleaved."""
    f64 = {"dtype": torch.float64, "device": "cpu"}
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, **f64) / dim))
    angles = torch.arange(max_len, **f64)[:, None] * inv_freq[None, :]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, n, Dh]; cos/sin [B, 1, n, Dh] (already gathered at each row's positions)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def self_attention_mask(key_mask: Tensor, n: int) -> Tensor:
    """[B, 1, n, P+n] bool, True = may attend, for a chunk of n queries after P cached keys.

    Query i sits at absolute index P+i. It sees key j iff (j <= P+i and key_mask[b, j]) or
    j == P+i: a position always sees itself, so no row is ever fully masked (a fully masked
    row gives NaN in ONNX Runtime). P comes from key_mask's shape, never from a constant.
    """
    total = key_mask.shape[1]
    k_idx = torch.arange(total, device=key_mask.device)
    q_idx = torch.arange(n, device=key_mask.device) + (total - n)
    causal = k_idx[None, :] <= q_idx[:, None]  # [n, P+n]
    diag = k_idx[None, :] == q_idx[:, None]
    allowed = (causal[None] & key_mask[:, None, :]) | diag[None]  # [B, n, P+n]
    return allowed[:, None]


# ---------------------------------------------------------------------------------------------
# Modules


class Attention(nn.Module):
    """The q/k/v/o projections and head split shared by self- and cross-attention."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def _heads(self, x: Tensor) -> Tensor:  # [B, n, d] -> [B, H, n, Dh]
        return x.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)


class SelfAttention(Attention):
    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                past_k: Tensor | None, past_v: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (output, present_k, present_v); present = past ++ this chunk's K/V.

        mask None means plain causal over a fresh sequence (training); the cached path always
        passes an explicit mask since SDPA's is_causal aligns top-left, wrong when P > 0.
        """
        q = apply_rope(self._heads(self.wq(x)), cos, sin)
        k = apply_rope(self._heads(self.wk(x)), cos, sin)
        v = self._heads(self.wv(x))
        if past_k is not None and past_v is not None:
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.wo(y.transpose(1, 2).flatten(2)), k, v


class CrossAttention(Attention):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__(cfg)
        # look-ahead decay per head (1-D: train_lm puts it in the no-weight-decay group)
        self.slope = nn.Parameter(torch.tensor(
            [LOOK_AHEAD_SLOPES[h % len(LOOK_AHEAD_SLOPES)] for h in range(cfg.n_heads)])
        ) if cfg.look_ahead else None

    def kv(self, audio: Tensor, rope: tuple[Tensor, Tensor] | None) -> KV:
        """audio [B, T, d] -> (K^T [B, H, Dh, T], V [B, H, T, Dh]); once per segment. rope:
        each frame's cos/sin [1, 1, T, Dh] ("time" positions), None for the authors' layout."""
        k = self._heads(self.wk(audio))
        if rope is not None:
            k = apply_rope(k, *rope)
        return k.transpose(2, 3), self._heads(self.wv(audio))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, k_t: Tensor, v: Tensor,
                ahead: LookAhead | None) -> Tensor:
        # "token": RoPE on the queries only (the audio carries its own absolute PE), as the
        # authors do; "time": cos/sin are at each query's tick, K^T was rotated at the frames'.
        q = apply_rope(self._heads(self.wq(x)), cos, sin)
        # Written out rather than SDPA: the exporter lowers SDPA with a Transpose of K, which
        # would copy K^T back every step. No padding mask: every frame is real audio.
        scores = (q * self.head_dim ** -0.5) @ k_t
        if self.slope is not None and ahead is not None:
            scores = scores + ahead.bias(self.slope)
        return self.wo((torch.softmax(scores, dim=-1) @ v).transpose(1, 2).flatten(2))


class LookAhead:
    """The look-ahead prior's frame geometry for one chunk, shared by every layer: a query at
    tick q sees the frames from tick q - LOOK_AHEAD_MARGIN on (never fewer than the last frame,
    so no row is fully masked) and scores frame tick k down by slope * max(0, k - q) / 100.
    Built from the query ticks and the frame count alone, so the step graph computes it."""

    def __init__(self, query_ticks: Tensor, frames: int, ticks_per_frame: int) -> None:
        kt = torch.arange(frames, device=query_ticks.device) * ticks_per_frame  # [T]
        rel = kt[None, None, :] - query_ticks[:, :, None]  # [B, n, T]
        first = torch.minimum(query_ticks - LOOK_AHEAD_MARGIN, kt[-1])
        self.masked = (kt[None, None, :] < first[:, :, None])[:, None]  # [B, 1, n, T]
        self.ahead = (rel.float().clamp(min=0) / 100.0)[:, None]  # [B, 1, n, T]

    def bias(self, slope: Tensor) -> Tensor:
        """[B, H, n, T] additive scores for one layer's per-head slopes [H]."""
        decay = -slope[None, :, None, None] * self.ahead
        return decay.masked_fill(self.masked, MASKED)


class PointerTimeHead(nn.Module):
    """Time-token logits as scores of the frames (time_head="pointer"): a pointer query from
    the final hidden state, rotated at the query's tick, against a pointer key per frame,
    rotated at the frame's tick. Tick t reads frame t // ticks_per_frame, plus a learned
    sub-frame offset (t % ticks_per_frame) * sub(h); ticks past the last frame are masked."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.q = nn.Linear(cfg.d_model, cfg.head_dim, bias=False)
        self.k = nn.Linear(cfg.d_model, cfg.head_dim, bias=False)
        self.sub = nn.Linear(cfg.d_model, 1)
        self.ticks_per_frame = cfg.ticks_per_frame
        self.register_buffer("tick_frame", torch.empty(0), persistent=False)
        self.register_buffer("tick_rest", torch.empty(0), persistent=False)
        self.reset_tables("cpu")

    def reset_tables(self, device: torch.device | str) -> None:
        """Each tick's frame and sub-frame rest (derived, not learned)."""
        ticks = torch.arange(vocab.SEGMENT_TICKS + 1, device=device)
        self.tick_frame = ticks // self.ticks_per_frame
        self.tick_rest = (ticks % self.ticks_per_frame).float()

    def keys(self, memory: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """memory [B, T, d] -> pointer keys^T [B, 1, Dh, T]; once per segment."""
        return apply_rope(self.k(memory)[:, None], *rope).transpose(2, 3)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, keys_t: Tensor) -> Tensor:
        """h [B, n, d] normed hidden states, cos/sin at their ticks -> [B, n, ticks] logits."""
        q = apply_rope(self.q(h)[:, None], cos, sin)  # [B, 1, n, Dh]
        scores = ((q * q.shape[-1] ** -0.5) @ keys_t)[:, 0]  # [B, n, T]
        frames = scores.shape[-1]
        frame = torch.minimum(self.tick_frame, torch.full_like(self.tick_frame, frames - 1))
        logits = scores[..., frame] + self.sub(h) * self.tick_rest
        return logits.masked_fill(self.tick_frame >= frames, MASKED)


class SwiGLU(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)  # up
        self.w2 = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = SelfAttention(cfg)
        self.mlp1_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp1 = SwiGLU(cfg)
        self.cross_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.cross = CrossAttention(cfg)
        self.mlp2_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp2 = SwiGLU(cfg)

    def forward(self, x: Tensor, rope: Rope, mask: Tensor | None, past_k: Tensor | None,
                past_v: Tensor | None, cross_k: Tensor, cross_v: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        h, k, v = self.attn(self.attn_norm(x), rope.cos, rope.sin, mask, past_k, past_v)
        x = x + h
        x = x + self.mlp1(self.mlp1_norm(x))
        x = x + self.cross(self.cross_norm(x), rope.query_cos, rope.query_sin, cross_k, cross_v,
                           rope.ahead)
        x = x + self.mlp2(self.mlp2_norm(x))
        return x, k, v


@dataclass
class Rope:
    """A chunk's rotations: self-attention at token positions; cross-attention queries at token
    positions ("token") or at their ticks ("time"), with the look-ahead geometry if any."""

    cos: Tensor
    sin: Tensor
    query_cos: Tensor
    query_sin: Tensor
    ahead: LookAhead | None = None


@dataclass
class CrossCache:
    """A segment's audio side, computed once (`Decoder.cross_kv`): per layer (K^T, V), and the
    pointer keys^T [B, 1, Dh, T] of a pointer time head."""

    layers: list[KV]
    pointer: Tensor | None = None
    rolls: Tensor | None = None  # a roll prior's evidence [B, 1, 4 x 88, T]

    def tensors(self) -> tuple[Tensor, ...]:
        """Flat, in the graphs' order (manifest.DecoderSpec.cross_names)."""
        flat = tuple(t for kv in self.layers for t in kv)
        return (*flat, *(t for t in (self.pointer, self.rolls) if t is not None))

    @classmethod
    def from_tensors(cls, flat: Sequence[Tensor], cfg: DecoderConfig) -> CrossCache:
        n = 2 * cfg.n_layers
        layers = [(flat[i], flat[i + 1]) for i in range(0, n, 2)]
        rest = list(flat[n:])
        pointer = rest.pop(0) if cfg.time_head == "pointer" else None
        return cls(layers, pointer, rest.pop(0) if cfg.roll_prior != "none" else None)


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.audio_proj = nn.Linear(cfg.enc_dim, cfg.d_model)
        self.audio_pe_proj = nn.Linear(cfg.audio_pe_dim, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)  # untied
        self.pointer = PointerTimeHead(cfg) if cfg.time_head == "pointer" else None
        self.prior = (RollPrior(cfg.roll_prior, cfg.ticks_per_frame)
                      if cfg.roll_prior != "none" else None)
        # Tables are derived, not learned: non-persistent, so checkpoints hold weights only.
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.register_buffer("audio_pe", torch.empty(0), persistent=False)
        self.reset_buffers()
        if self.head.weight.device.type != "meta":
            self.apply(self._init_weights)
            # GPT-2-style: shrink the projections that write into the residual stream
            # (4 residual branches per block), so the stream's variance stays O(1) at init.
            std = 0.02 / math.sqrt(4 * cfg.n_layers)
            for name, p in self.named_parameters():
                if name.endswith(("attn.wo.weight", "cross.wo.weight", ".w2.weight")):
                    nn.init.normal_(p, mean=0.0, std=std)
            if self.prior is not None:
                self.start_from_the_rolls()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def start_from_the_rolls(self) -> None:
        """A roll prior's stage starts as the roll decoder: the LM's own scores of the slots the
        prior decides (the head rows, the pointer's query and sub-frame offset) start at zero,
        so its untrained noise cannot tip them; training grows them from there."""
        slots = {"onset": [vocab.EOS, *range(vocab.PITCH_BASE, vocab.VELOCITY_BASE)],
                 "velocity": list(range(vocab.VELOCITY_BASE, vocab.VOCAB_SIZE)),
                 "offset": [vocab.NOTE_SUSTAIN]}[self.cfg.roll_prior]
        with torch.no_grad():
            self.head.weight[slots] = 0.0
            if self.pointer is not None and self.cfg.roll_prior != "velocity":
                self.pointer.q.weight.zero_()
                self.pointer.sub.weight.zero_()  # its sub-frame tick offset too
                self.pointer.sub.bias.zero_()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the RoPE and audio-PE tables, e.g. after loading weights into a model
        built on the meta device."""
        if device is None:
            device = self.head.weight.device
            if device.type == "meta":
                device = "cpu"  # tables are tiny; keep them real even for a meta model
        cos, sin = rope_table(self.cfg.max_seq_len, self.cfg.head_dim, self.cfg.rope_base)
        self.rope_cos = cos.to(device)
        self.rope_sin = sin.to(device)
        self.audio_pe = sinusoidal_table(self.cfg.max_frames, self.cfg.audio_pe_dim).to(device)
        if self.pointer is not None:
            self.pointer.reset_tables(device)

    # -- shared pieces ----------------------------------------------------------------------

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [B, n] int64 -> cos, sin [B, 1, n, Dh]; per row, so rows may differ."""
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]

    def _chunk_rope(self, positions: Tensor, query_ticks: Tensor | None, frames: int) -> Rope:
        cos, sin = self._rope(positions)
        if not self.cfg.time_aligned:
            return Rope(cos, sin, cos, sin)
        if query_ticks is None:
            raise ValueError("a time-aligned decoder needs query_ticks (vocab.query_ticks)")
        qcos, qsin = self._rope(query_ticks)
        ahead = (LookAhead(query_ticks, frames, self.cfg.ticks_per_frame)
                 if self.cfg.look_ahead else None)
        return Rope(cos, sin, qcos, qsin, ahead)

    def audio_memory(self, audio_emb: Tensor) -> Tensor:
        """[B, T, >= enc_offset + enc_dim] -> [B, T, d]: this decoder's part of the embeddings,
        projected, plus the projected absolute PE."""
        audio_emb = self._own_part(audio_emb)
        t = audio_emb.shape[1]
        return self.audio_proj(audio_emb) + self.audio_pe_proj(self.audio_pe[:t])[None]

    def _own_part(self, audio_emb: Tensor) -> Tensor:
        """embeddings[..., enc_offset : enc_offset + enc_dim]: what this decoder reads."""
        lo, width = self.cfg.enc_offset, self.cfg.enc_dim
        if audio_emb.shape[-1] != width or lo:  # traced as a constant slice
            audio_emb = audio_emb[..., lo:lo + width]
        return audio_emb

    def cross_kv(self, audio_emb: Tensor) -> CrossCache:
        """[B, T, enc_dim] -> per layer (K^T [B, H, Dh, T], V [B, H, T, Dh]) and, with a
        pointer head, its keys; once per segment. "time": keys rotated at their frames' ticks."""
        mem = self.audio_memory(audio_emb)
        rope = None
        if self.cfg.time_aligned:
            ticks = torch.arange(mem.shape[1], device=mem.device) * self.cfg.ticks_per_frame
            rope = (self.rope_cos[ticks][None, None], self.rope_sin[ticks][None, None])
        layers = [blk.cross.kv(mem, rope) for blk in self.blocks]
        pointer = None if self.pointer is None else self.pointer.keys(mem, rope)  # rope: time
        rolls = None if self.prior is None else features(self._own_part(audio_emb))
        return CrossCache(layers, pointer, rolls)

    def _logits(self, h: Tensor, rope: Rope, cross: CrossCache, tokens: Tensor,
                query_ticks: Tensor | None) -> Tensor:
        """h [B, n] final normed states -> [B, n, V]; a pointer head writes the time slots, a
        roll prior adds its terms (it reads each position's token and query tick)."""
        if self.pointer is None or cross.pointer is None:
            logits = self.head(h)
        else:
            w = self.head.weight  # the time rows go unused (one layout for every stage)
            times = self.pointer(h, rope.query_cos, rope.query_sin, cross.pointer)
            logits = torch.cat([F.linear(h, w[:vocab.TIME_BASE]), times.to(h.dtype),
                                F.linear(h, w[vocab.PITCH_BASE:])], dim=-1)
        if self.prior is None or cross.rolls is None or query_ticks is None:
            return logits
        return logits + self.prior(tokens, query_ticks, cross.rolls)

    # -- training / full-prefix pass --------------------------------------------------------

    def forward(self, tokens: Tensor, audio_emb: Tensor, positions: Tensor | None = None,
                key_mask: Tensor | None = None, query_ticks: Tensor | None = None) -> Tensor:
        """tokens [B, S], audio_emb [B, T, E] -> logits [B, S, V].

        Without positions/key_mask: plain causal LM (training; right padding needs no mask).
        With them: the same masking and position semantics as `step` on an empty cache, used by
        the authors'-style uncached decode (re-run the whole prefix every step).
        query_ticks [B, S] (vocab.query_ticks of the tokens): required by "time" decoders.
        """
        b, s = tokens.shape
        if positions is None:
            positions = torch.arange(s, device=tokens.device).expand(b, s)
        mask = None if key_mask is None else self_attention_mask(key_mask, s)
        rope = self._chunk_rope(positions, query_ticks, audio_emb.shape[1])
        cross = self.cross_kv(audio_emb)
        x = self.tok_emb(tokens)
        for blk, (cross_k, cross_v) in zip(self.blocks, cross.layers):
            x, _, _ = blk(x, rope, mask, None, None, cross_k, cross_v)
        return self._logits(self.norm(x), rope, cross, tokens, query_ticks)

    # -- incremental, export-friendly -------------------------------------------------------

    def step(self, tokens: Tensor, positions: Tensor, key_mask: Tensor, past: Sequence[KV],
             cross: CrossCache, query_ticks: Tensor | None = None) -> tuple[Tensor, list[KV]]:
        """Feed a chunk of n tokens after P cached ones.

        tokens, positions: int64 [B, n]; key_mask: bool [B, P+n] (False = padding, invisible
        to later queries); past: per layer (K, V), each [B, H, P, Dh] (P may be 0); cross: from
        `cross_kv`; query_ticks: int64 [B, n], "time" decoders only (the runtime tracks them,
        backend.RowPositions).
        Returns logits [B, n, V], after each of the chunk's positions (the decode loop reads
        the last; a speculative verify reads them all), and present: per layer (K, V), each
        [B, H, P+n, Dh].
        """
        mask = self_attention_mask(key_mask, tokens.shape[1])
        rope = self._chunk_rope(positions, query_ticks, cross.layers[0][1].shape[2])
        x = self.tok_emb(tokens)
        present = []
        for blk, (past_k, past_v), (cross_k, cross_v) in zip(self.blocks, past, cross.layers):
            x, k, v = blk(x, rope, mask, past_k, past_v, cross_k, cross_v)
            present.append((k, v))
        return self._logits(self.norm(x), rope, cross, tokens, query_ticks), present

    def empty_cache(self, batch: int) -> list[KV]:
        """Per layer a past K and V of length 0, [B, H, 0, Dh] each."""
        c = self.cfg
        w = self.head.weight
        return [(w.new_zeros(batch, c.n_heads, 0, c.head_dim),
                 w.new_zeros(batch, c.n_heads, 0, c.head_dim)) for _ in range(c.n_layers)]


def sharpen(model: nn.Module, seed: int = 1) -> nn.Module:
    """Re-draw a random model's weights at O(1) scale, for parity tests and benchmarks. At the
    LM init (std 0.02) attention is nearly uniform and a masking or position bug would hide
    below 1e-5; here every key and position counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and p.ndim == 2:
                fan_in = p.shape[1] if "emb" not in name else 1
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / fan_in**0.5)
    return model
