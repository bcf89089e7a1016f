"""The graph contract: the fixed input and output names of an exported model's ONNX graphs (the
encoder, and per stage a cross-KV graph and a decoder-step graph), in their order, and the
shapes and layouts of the per-layer caches and the piano rolls they carry.

One definition shared by the exporter (export/onnx_export.py), the manifest's validator
(runtime/manifest.py), ONNX Runtime and TensorRT (runtime/trt_backend.py); docs/manifest.md
describes the interface. Torch-free: the runtime's vocabulary and roll keys only.
"""

from __future__ import annotations

from . import vocab
from .rolls import PEDAL_KEYS, ROLL_KEYS

# The graph interface: fixed input/output names, in this order.
ENCODER_IO = (("waveform",), ("embeddings",))
ENCODER_ROLLS_IO = (("waveform",), ("embeddings", *ROLL_KEYS))  # with `encoder.rolls`
# with `encoder.rolls` that has a sustain-pedal model: three more rolls, [batch, frames, 1]
ENCODER_PEDAL_IO = (("waveform",), ("embeddings", *ROLL_KEYS, *PEDAL_KEYS))
# The one roll layout runtime/rolls.py decodes: column k is MIDI key min_pitch + k, and the
# velocity roll x velocity_scale is the MIDI velocity.
ROLL_LAYOUT = {"min_pitch": vocab.MIN_PITCH, "num_pitches": vocab.NUM_PITCHES,
               "velocity_scale": 127}
IO = tuple[tuple[str, ...], tuple[str, ...]]  # a graph's input names, output names


def kv_names(prefix: str, n_layers: int) -> tuple[str, ...]:
    """Per-layer cache tensor names, ONNX Runtime GenAI style: `{prefix}.{layer}.key` and
    `.value`, layer by layer. Prefixes: `past_key_values` (step inputs), `present` (step
    outputs, past ++ chunk), `cross` (the cross-KV graph's outputs, step inputs)."""
    return tuple(f"{prefix}.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value"))


POINTER_KEY = "cross.pointer.key"  # a pointer time head's keys^T [batch, 1, head_dim, frames]
# A roll prior's per-segment evidence [batch, 1, ROLL_FEATURES, frames] (docs/decoder.md):
# peak-masked onset logits, offset and frame logits, the velocity roll, 88 keys each
ROLL_PRIOR = "cross.rolls"
ROLL_FEATURES = 4 * vocab.NUM_PITCHES


def cache_length_axis(name: str) -> int:
    """Where a per-layer cache tensor keeps its length: axis 2 of [batch, heads, length,
    head_dim], axis 3 for a cross K, stored transposed [batch, heads, head_dim, frames]."""
    return 3 if name == ROLL_PRIOR or (name.startswith("cross.") and name.endswith(".key")) else 2


def cache_shape(name: str, batch: int, heads: int, head_dim: int, length: int
                ) -> tuple[int, int, int, int]:
    """The shape of per-layer cache tensor `name` (kv_names, or POINTER_KEY: one head) holding
    `length` positions."""
    if name == ROLL_PRIOR:
        return batch, 1, ROLL_FEATURES, length
    heads = 1 if name == POINTER_KEY else heads
    if cache_length_axis(name) == 3:
        return batch, heads, head_dim, length
    return batch, heads, length, head_dim


def cross_names(n_layers: int, pointer: bool = False, rolls: bool = False) -> tuple[str, ...]:
    """The cross-KV graph's outputs, which the step graph takes: per layer K^T and V, then a
    pointer time head's keys, then a roll prior's evidence."""
    return (*kv_names("cross", n_layers), *((POINTER_KEY,) if pointer else ()),
            *((ROLL_PRIOR,) if rolls else ()))


def step_inputs(time_aligned: bool = False) -> tuple[str, ...]:
    """The step graph's host-side inputs, fed fresh every step (the caches follow them)."""
    return ("tokens", "positions", "key_mask", *(("query_ticks",) if time_aligned else ()))


def cross_kv_io(n_layers: int, pointer: bool = False, rolls: bool = False) -> IO:
    """embeddings [batch, frames, E] -> per layer cross.{i}.key [batch, heads, head_dim, frames]
    (transposed: q K^T reads it as it is) and cross.{i}.value [batch, heads, frames, head_dim];
    with a pointer time head, cross.pointer.key [batch, 1, head_dim, frames]."""
    return ("embeddings",), cross_names(n_layers, pointer, rolls)


def step_io(n_layers: int, time_aligned: bool = False, pointer: bool = False,
            rolls: bool = False) -> IO:
    """tokens, positions [batch, chunk]; key_mask [batch, past_plus_chunk]; time-aligned:
    query_ticks [batch, chunk]; past_key_values.{i}.key/value [batch, heads, past, head_dim];
    the cross-KV graph's outputs -> logits [batch, chunk, vocab] (format 6; before:
    [batch, vocab], the last position's); present.{i}.key/value [batch, heads,
    past_plus_chunk, head_dim]."""
    return ((*step_inputs(time_aligned), *kv_names("past_key_values", n_layers),
             *cross_names(n_layers, pointer, rolls)), ("logits", *kv_names("present", n_layers)))
