"""Same weights, same tokens: greedy decode (no forcing) through the runtime and the PyTorch
references, compared token for token.

The benchmarked systems' decoders are sharpened (models.py), so greedy argmax makes real
decisions; a masking, position or cache bug in one backend shows up as different tokens. The
onset stage runs free until eos or `max_notes`, which bounds the authors' decode's cost.

Reduced precisions change decisions by design, not by bug: their greedy notes are scored
against the fp32 runtime's with the note F1 of `pianolm eval` (the precision's F1 cost on these
random weights; a trained model's: `pianolm eval` on its int8 export).
"""

from __future__ import annotations

import numpy as np

from pianolm.runtime.backend import Backend
from pianolm.runtime.decode import RowSpec, SegmentTokens, decode_batch, to_notes
from pianolm.runtime.metrics import MetricsUnavailable, require_mir_eval, score_notes

# The runtime first: the others are compared with it.
COMPARED = ("ort-fp32", "torch-cache", "torch-nocache")
REDUCED = ("ort-int8",)  # scored against COMPARED[0] by note F1


def greedy_tokens(backend: Backend, audio: np.ndarray, spec: RowSpec, max_notes: int
                  ) -> dict[str, list[int]]:
    (seg,) = decode_batch(backend, audio[None], [spec], max_notes=max_notes, concurrent=False)
    return seg.tokens


def compare_tokens(tokens: dict[str, dict[str, list[int]]], max_notes: int) -> dict:
    """tokens: backend -> stage -> greedy tokens of one segment. `identical` when every backend
    agrees with the first of COMPARED present (None with fewer than two backends)."""
    names = [n for n in COMPARED if n in tokens]
    if len(names) < 2:
        return {"identical": None, "backends": names,
                "note": "needs two of " + ", ".join(COMPARED)}
    ref = tokens[names[0]]
    differ = {n: sorted(s for s in ref if tokens[n].get(s) != ref[s]) for n in names[1:]}
    return {"identical": not any(differ.values()), "backends": names,
            "tokens": {s: len(t) for s, t in ref.items()},
            "differing_stages": {n: d for n, d in differ.items() if d},
            "max_notes": max_notes}


def precision_cost(tokens: dict[str, dict[str, list[int]]]) -> dict:
    """tokens as in compare_tokens: each REDUCED backend's greedy notes scored against the fp32
    runtime's (F1 1.0 = no cost)."""
    ref_name = COMPARED[0]
    names = [n for n in REDUCED if n in tokens]
    if ref_name not in tokens or not names:
        return {}
    try:
        require_mir_eval()
    except MetricsUnavailable as e:
        return {n: {"note": str(e)} for n in names}
    ref = to_notes([SegmentTokens(0, tokens[ref_name], [])])
    out = {}
    for name in names:
        notes = to_notes([SegmentTokens(0, tokens[name], [])])
        scores = score_notes(notes, ref)
        out[name] = {"against": ref_name, "same_tokens": tokens[name] == tokens[ref_name],
                     **{k: round(v, 4) for k, v in scores.items()}}
    return out
