"""The paper authors' stage decoders, converted to pianolm's `Decoder`.

The authors (LiDCC/Improving-piano-transcription-by-LLM-based-decoder) train one decoder per
stage, `EncDecPos` in their models/enc_dec.py, and save `model.state_dict()` as `step=N.pth`.
Their architecture is pianolm's "token" layout (docs/decoder.md) block for block, so a
conversion is exact up to float rounding. What differs is only how the weights are stored
(the mapping study, docs of record: shared research checkpoints.md, sections 2.2-2.5):

- fused projections: self-attention `c_attn` [3d, d] holds q, k, v rows; cross-attention
  `c_attn` [d, d] is q and `c_attn2` [2d, d] holds k, v (keys and values of the audio);
- RoPE pairing: they rotate adjacent pairs (2j, 2j+1), pianolm rotates halves (j, j + hs/2).
  Permuting the rows of wq and wk inside each head turns one into the other; q.k is a sum over
  the head's dimensions, so any permutation applied to both q and k leaves it unchanged. Their
  cross-attention keys are not rotated, but its q rows are permuted, so its k rows must be too;
- vocabulary: theirs has 6504 tokens, pianolm 1225, each of which has a row in theirs
  (`authors_vocab_rows`): the embedding and LM head rows are gathered;
- HPPNet embeddings: theirs are key-major, pianolm's roll-major (`_hppnet_columns`), so the
  columns of the audio projection are permuted; the CRNN's 1536-d embedding is in one order;
- the rest are renames (RMSNorm `scale` -> `weight`, SwiGLU c_fc1/c_fc2/c_proj -> w1/w3/w2,
  `pos_fc` -> `audio_pe_proj`, `ln_f` -> `norm`).

Their RoPE and audio PE tables are not in the state dict (plain attributes), nor are ours
(non-persistent buffers): both are rebuilt from the same formulas.

Their code has no licence: this module was written from its documented conventions and
shares no code with it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pianolm.runtime import vocab

from .decoder import Decoder, DecoderConfig
from .frontend import ROLL_KEYS
from .torch_files import load_torch_file

__all__ = [
    "AUTHORS_VOCAB_SIZE",
    "ENCODER_DIMS",
    "AuthorsImportError",
    "authors_vocab_rows",
    "convert_decoder",
    "load_stage_checkpoint",
]

_SHOW = 4  # keys named per kind of mismatch in an error line


class AuthorsImportError(ValueError):
    """A file or state dict that cannot be imported as the authors' decoder (one line)."""


# ---------------------------------------------------------------------------------------------
# Vocabulary


@dataclass(frozen=True)
class _Block:
    name: str
    size: int


# The authors' `Tokenizer` (data/tokenizers.py, at their HEAD and at the paper-era commit)
# concatenates these sub-tokenizers in this order; an id is its block's start plus its index.
# Names and tasks reserve 100 ids each of which only the first few are used; time is
# 0..6000 in 10 ms steps (60 s); labels are maestro 1 + slakh2100 16 + gtzan 10.
_AUTHORS_BLOCKS = (
    _Block("special", 4),  # <pad> <sos> <eos> <unk>
    _Block("name", 100),  # name=note_on, note_off, note_sustain, pedal_*, beat, downbeat
    _Block("time", 6001),
    _Block("label", 27),
    _Block("pitch", 128),  # pitch=0..127
    _Block("velocity", 128),  # velocity=0..127
    _Block("beat_index", 16),
    _Block("task", 100),  # task=onset, offset, velocity, flatten
)
_BASE = dict(zip((b.name for b in _AUTHORS_BLOCKS),
                 accumulate((b.size for b in _AUTHORS_BLOCKS), initial=0)))
AUTHORS_VOCAB_SIZE = sum(b.size for b in _AUTHORS_BLOCKS)  # 6504
_NOTE_SUSTAIN = 2  # index of name=note_sustain in its block
_TASKS = ("onset", "offset", "velocity", "flatten")  # their task block, in order
_OUR_TASKS = {vocab.TASK_ONSET: "onset", vocab.TASK_OFFSET: "offset",
              vocab.TASK_VELOCITY: "velocity", vocab.TASK_FLAT: "flatten"}


def authors_vocab_rows() -> list[int]:
    """For each pianolm token id 0..1224, the authors' id of the same token.

    Every pianolm token has one (their <unk>, labels, beats, pedal names, times past 10 s and
    pitches outside the piano are simply not kept), so gathering these rows is lossless.
    """
    rows = [0] * vocab.VOCAB_SIZE
    for ours in (vocab.PAD, vocab.SOS, vocab.EOS):  # same three first ids in both
        rows[ours] = _BASE["special"] + ours
    for ours, task in _OUR_TASKS.items():
        rows[ours] = _BASE["task"] + _TASKS.index(task)
    rows[vocab.NOTE_SUSTAIN] = _BASE["name"] + _NOTE_SUSTAIN
    for tick in range(vocab.SEGMENT_TICKS + 1):
        rows[vocab.time_token(tick)] = _BASE["time"] + tick
    for pitch in range(vocab.MIN_PITCH, vocab.MAX_PITCH + 1):
        rows[vocab.pitch_token(pitch)] = _BASE["pitch"] + pitch
    for velocity in range(vocab.NUM_VELOCITIES):
        rows[vocab.velocity_token(velocity)] = _BASE["velocity"] + velocity
    return rows


# ---------------------------------------------------------------------------------------------
# Permutations


def _rope_rows(d_model: int, n_heads: int) -> Tensor:
    """Row order turning adjacent-pair RoPE rows into rotate-half rows, per head: new row j
    <- old 2j, new row hs/2 + j <- old 2j + 1 (pair j keeps its frequency theta_j)."""
    hs = d_model // n_heads
    within = torch.cat([torch.arange(0, hs, 2), torch.arange(1, hs, 2)])
    return torch.cat([h * hs + within for h in range(n_heads)])


def _hppnet_columns(keys: int = vocab.NUM_PITCHES) -> Tensor:
    """For each of pianolm's HPPNet embedding columns (roll r, key k at r * 88 + k, rolls in
    ROLL_KEYS order), the authors' column: they stack (onset, frame, offset, velocity) on the
    channel axis and flatten [T, 88, 4], so key k of roll r sits at k * 4 + r."""
    theirs = ("onset", "frame", "offset", "velocity")
    return torch.tensor([k * len(theirs) + theirs.index(roll)
                         for roll in ROLL_KEYS for k in range(keys)])


# ---------------------------------------------------------------------------------------------
# Decoder conversion

# encoder name -> width of its frame embeddings; "hppnet" needs the column permutation
ENCODER_DIMS = {"crnn": 1536, "hppnet": 352}
_TICKS_PER_FRAME = {"crnn": 1, "hppnet": 2}  # 100 and 50 frames per second
_LAYER = re.compile(r"transformer\.h\.(\d+)\.")


def _authors_shapes(n_layers: int, d: int, hidden: int, enc_dim: int) -> dict[str, tuple]:
    """Every key of an `EncDecPos` state dict and its shape."""
    shapes: dict[str, tuple] = {
        "transformer.wte.weight": (AUTHORS_VOCAB_SIZE, d),
        "lm_head.weight": (AUTHORS_VOCAB_SIZE, d),
        "audio_emb_to_emb.weight": (d, enc_dim),
        "audio_emb_to_emb.bias": (d,),
        "pos_fc.weight": (d, 64),
        "pos_fc.bias": (d,),
        "transformer.ln_f.scale": (d,),
    }
    for i in range(n_layers):
        p = f"transformer.h.{i}."
        for side in ("self", "cross"):
            shapes[f"{p}{side}_rms_1.scale"] = (d,)
            shapes[f"{p}{side}_rms_2.scale"] = (d,)
            shapes[f"{p}{side}_mlp.c_fc1.weight"] = (hidden, d)
            shapes[f"{p}{side}_mlp.c_fc2.weight"] = (hidden, d)
            shapes[f"{p}{side}_mlp.c_proj.weight"] = (d, hidden)
            shapes[f"{p}{side}_attn.c_proj.weight"] = (d, d)
        shapes[f"{p}self_attn.c_attn.weight"] = (3 * d, d)
        shapes[f"{p}cross_attn.c_attn.weight"] = (d, d)
        shapes[f"{p}cross_attn.c_attn2.weight"] = (2 * d, d)
    return shapes


def _key_problems(state: Mapping[str, Tensor], shapes: dict[str, tuple]) -> str:
    """'' if `state` has exactly these keys and shapes, else what is wrong, in one line."""
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes]
    mis_shaped = [f"{k} {list(state[k].shape)} (want {list(shapes[k])})"
                  for k in shapes if k in state and tuple(state[k].shape) != shapes[k]]
    found = []
    for label, keys in (("missing", missing), ("unexpected", unexpected),
                        ("shape mismatch", mis_shaped)):
        if keys:
            more = f", +{len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
            found.append(f"{len(keys)} {label}: {', '.join(keys[:_SHOW])}{more}")
    return "; ".join(found)


def convert_decoder(state: Mapping[str, Tensor], n_heads: int, encoder: str,
                    source: str = "state dict") -> tuple[DecoderConfig, dict[str, Tensor]]:
    """The authors' `EncDecPos` state dict -> (DecoderConfig, state dict for `Decoder(cfg)`).

    Sizes come from the shapes; the head count does not show in any shape, so the caller gives
    it (their configs: 16 heads, 8 for the HPPNet onset stage and the small DDP runs).
    `encoder` ("crnn" or "hppnet") must match the width of `audio_emb_to_emb`. `source` names
    the file in error messages. Raises AuthorsImportError (one line) for anything else.
    """
    def fail(why: str) -> AuthorsImportError:
        return AuthorsImportError(f"{source}: {why}")

    if encoder not in ENCODER_DIMS:
        raise fail(f"unknown encoder {encoder!r}; choose from {sorted(ENCODER_DIMS)}")
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise fail(f"not a state dict of tensors ({len(bad)} other values, e.g. {bad[0]!r})")
    anchors = ("transformer.wte.weight", "audio_emb_to_emb.weight",
               "transformer.h.0.self_mlp.c_fc1.weight")
    absent = [k for k in anchors if k not in state]
    if absent:
        raise fail(f"not the authors' EncDecPos layout: missing {', '.join(absent)}")

    # Sizes from shapes; every shape is then checked against them.
    d_model = state["transformer.wte.weight"].shape[-1]
    enc_dim = state["audio_emb_to_emb.weight"].shape[-1]
    hidden = state["transformer.h.0.self_mlp.c_fc1.weight"].shape[0]
    n_layers = 1 + max(int(m.group(1)) for k in state if (m := _LAYER.match(k)))
    if not isinstance(n_heads, int) or n_heads < 1 or d_model % n_heads:
        raise fail(f"n_heads {n_heads} does not divide d_model {d_model}")
    if (d_model // n_heads) % 2:
        raise fail(f"head size {d_model // n_heads} is odd: RoPE rotates pairs")
    if enc_dim != ENCODER_DIMS[encoder]:
        raise fail(f"audio_emb_to_emb takes {enc_dim}-d frames; the {encoder} encoder gives "
                   f"{ENCODER_DIMS[encoder]} (choose the encoder this stage was trained with)")
    problems = _key_problems(state, _authors_shapes(n_layers, d_model, hidden, enc_dim))
    if problems:
        raise fail(f"not the authors' EncDecPos layout: {problems}")

    cfg = DecoderConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, enc_dim=enc_dim,
                        max_seq_len=2048,  # their block_size: the RoPE table's length
                        cross_positions="token", look_ahead=False, time_head="lm",
                        ticks_per_frame=_TICKS_PER_FRAME[encoder])
    if hidden != cfg.mlp_hidden:  # both round 8d/3 up to a multiple of 256: never seen
        raise fail(f"MLP hidden size {hidden}; pianolm's SwiGLU at d_model {d_model} has "
                   f"{cfg.mlp_hidden}")

    w = {k: v.detach().to(torch.float32) for k, v in state.items()}
    rope = _rope_rows(d_model, n_heads)
    rows = torch.tensor(authors_vocab_rows())
    audio_w = w["audio_emb_to_emb.weight"]
    if encoder == "hppnet":
        audio_w = audio_w[:, _hppnet_columns()]
    out = {
        "tok_emb.weight": w["transformer.wte.weight"][rows],
        "head.weight": w["lm_head.weight"][rows],
        "audio_proj.weight": audio_w,
        "audio_proj.bias": w["audio_emb_to_emb.bias"],
        "audio_pe_proj.weight": w["pos_fc.weight"],
        "audio_pe_proj.bias": w["pos_fc.bias"],
        "norm.weight": w["transformer.ln_f.scale"],
    }
    d = d_model
    for i in range(n_layers):
        p, b = f"transformer.h.{i}.", f"blocks.{i}."
        q, k, v = w[f"{p}self_attn.c_attn.weight"].split(d)  # their q, k, v order
        cross_k, cross_v = w[f"{p}cross_attn.c_attn2.weight"].split(d)  # k, v order
        out |= {
            f"{b}attn_norm.weight": w[f"{p}self_rms_1.scale"],
            f"{b}attn.wq.weight": q[rope],
            f"{b}attn.wk.weight": k[rope],
            f"{b}attn.wv.weight": v,
            f"{b}attn.wo.weight": w[f"{p}self_attn.c_proj.weight"],
            f"{b}mlp1_norm.weight": w[f"{p}self_rms_2.scale"],
            f"{b}cross_norm.weight": w[f"{p}cross_rms_1.scale"],
            f"{b}cross.wq.weight": w[f"{p}cross_attn.c_attn.weight"][rope],
            f"{b}cross.wk.weight": cross_k[rope],  # unrotated, but paired with q's rows
            f"{b}cross.wv.weight": cross_v,
            f"{b}cross.wo.weight": w[f"{p}cross_attn.c_proj.weight"],
            f"{b}mlp2_norm.weight": w[f"{p}cross_rms_2.scale"],
        }
        for side, mlp in (("self", "mlp1"), ("cross", "mlp2")):
            out |= {  # silu(c_fc1 x) * c_fc2 x -> c_proj, as silu(w1 x) * w3 x -> w2
                f"{b}{mlp}.w1.weight": w[f"{p}{side}_mlp.c_fc1.weight"],
                f"{b}{mlp}.w3.weight": w[f"{p}{side}_mlp.c_fc2.weight"],
                f"{b}{mlp}.w2.weight": w[f"{p}{side}_mlp.c_proj.weight"],
            }
    out = {k: v.contiguous() for k, v in out.items()}
    # The layout above must be exactly Decoder's: a strict load on the meta device checks it
    # for free (a mistake here is a bug of ours, not of the file).
    with torch.device("meta"):
        Decoder(cfg).load_state_dict(out, strict=True, assign=True)
    return cfg, out


# ---------------------------------------------------------------------------------------------
# Reading a stage file


def load_stage_checkpoint(path: str | os.PathLike, trust_pickle: bool = False
                          ) -> dict[str, Tensor]:
    """A stage file (`step=N.pth`) -> its state dict of tensors.

    Accepts a bare state dict, `{'model': sd}` or `{'state_dict': sd}`, and strips DDP's
    `module.` prefix. Loads tensors only (`weights_only=True`); a file holding pickled Python
    objects (e.g. a whole module) is refused unless `trust_pickle`, since unpickling it runs
    whatever code the file names. Raises AuthorsImportError (one line, naming the file).
    """
    path = Path(path)
    obj = load_torch_file(path, AuthorsImportError, trust_pickle)
    return _state_dict(path, obj)


def _state_dict(path: Path, obj: Any) -> dict[str, Tensor]:
    """Unwrap the containers the authors' and common training scripts write."""
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):
            if wrapper in obj and isinstance(obj[wrapper], (dict, nn.Module)):
                obj = obj[wrapper]
                break
    if isinstance(obj, nn.Module):  # a pickled module: only reached with trust_pickle
        obj = obj.state_dict()
    if not (isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values())):
        kind = (f"keys {sorted(map(str, obj))[:_SHOW]}" if isinstance(obj, dict)
                else type(obj).__name__)
        raise AuthorsImportError(f"{path}: holds {kind}; expected a state dict of tensors "
                                 "(bare, or under 'model' / 'state_dict')")
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


# ---------------------------------------------------------------------------------------------
# Their HPPNet encoder (hppnet/nets.py, WX-Wei/HPPNet's `hpp_sp` with model_size 128)

# Their module names -> pianolm's (export/hppnet.py): the onset and frame subnets are
# subnets 0 and 1, the harmonic convolutions a list, a head's BiLSTM and linear one level up.
_HPPNET_RENAMES = ((r"^subnet_onset\.", "subnets.0."), (r"^subnet_frame\.", "subnets.1."),
                   (r"\.conv_3\.conv_([1-8])\.", lambda m: f".conv_3.convs.{int(m[1]) - 1}."),
                   (r"\.head\.lstm\.rnn\.", ".lstm."), (r"\.head\.linear\.", ".linear."))


def hppnet_key(theirs: str) -> str:
    """Their HPPNet state-dict key -> pianolm's HPPNet key."""
    for pattern, replacement in _HPPNET_RENAMES:
        theirs = re.sub(pattern, replacement, theirs)
    return theirs


def load_hppnet_encoder(path: str | os.PathLike, trust_pickle: bool = False) -> nn.Module:
    """Their HPPNet encoder -> pianolm's `hppnet` encoder with its weights, in eval mode.

    Reads a state dict (their `step=N_encoder.pth`) or, with `trust_pickle`, a pickled module
    (`hpp-10secondsInput-120000.pt`, whose unpickling needs their `hppnet` package). Their
    nnAudio CQT is a module global, not in the state dict: pianolm's own front-end computes
    it (docs/import.md says how closely). Raises AuthorsImportError naming the file.
    """
    from .hppnet import HPPNet

    state = {hppnet_key(k): v for k, v in load_stage_checkpoint(path, trust_pickle).items()}
    model = HPPNet()
    problems = _key_problems(state, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    if problems:
        raise AuthorsImportError(f"{path}: not their HPPNet (sp, model_size 128) state dict "
                                 f"(keys as pianolm names them): {problems}")
    model.load_state_dict(state, strict=True)
    return model.eval()
