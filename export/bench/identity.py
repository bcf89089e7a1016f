"""Same weights, same tokens: greedy decode (no forcing) through the runtime and the PyTorch
references, compared token for token.

The benchmarked systems' decoders are sharpened (models.py), so greedy argmax makes real
decisions; a masking, position or cache bug in one backend shows up as different tokens. The
onset stage runs free until eos or `max_notes`, which bounds the authors' decode's cost.
"""

from __future__ import annotations

import numpy as np

from pianolm.runtime.backend import Backend
from pianolm.runtime.decode import RowSpec, decode_batch

# The runtime first: the others are compared with it.
COMPARED = ("ort-fp32", "torch-cache", "torch-nocache")


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
