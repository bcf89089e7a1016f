"""How few decoder calls roll drafts can reach on the shipped model: the dev set decoded at
batch 1 with the velocity/offset stages verifying fixed windows of W notes (and the onset stage
its widest draft), against the runtime's own windows (README "Speculative decoding").

Calls, not times: a verify call of many tokens costs about one step on a GPU, so the calls per
note at the widest window bound what speculation can gain there. Every run must give the plain
greedy tokens.

    python benchmarks/speculative_windows.py --out benchmarks/results/speculative_windows.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from speculative_devset import decode_all, load_clips

from pianolm.engines import DEFAULT_MODEL_DIR
from pianolm.runtime import decode
from pianolm.runtime.decode import Speculation
from pianolm.runtime.ort_backend import OrtBackend
from pianolm.runtime.provenance import provenance
from pianolm.runtime.speculative import NOTE_DRAFT, ONSET_DRAFT

WINDOWS = (1, 4, 8, 16, 32, 64)


def fixed(notes: int):  # noqa: ANN201
    """A window policy (decode.next_window): always `notes` notes, the onset stage its widest."""
    def window(kept: np.ndarray, max_draft: int) -> np.ndarray:
        return np.full_like(kept, notes if max_draft == NOTE_DRAFT else ONSET_DRAFT)
    return window


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devset", type=Path, default=Path("../shared/devset"))
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/"
                                                      "speculative_windows.json"))
    args = ap.parse_args()
    backend = OrtBackend(args.model, threads=1)
    m = backend.manifest
    _, clips = load_clips(args.devset, backend)
    speculation = Speculation(m.encoder.frames_per_second, m.encoder.rolls.thresholds)
    _, greedy, plain = decode_all(clips, None)
    notes = sum(len(t["velocity"]) // 3 for t, _ in greedy)
    policies = {"runtime": decode.next_window} | {f"fixed_{w}": fixed(w) for w in WINDOWS}
    runs = {}
    for name, policy in policies.items():
        decode.next_window = policy  # the loops read it per call
        _, tokens, stats = decode_all(clips, speculation)
        assert tokens == greedy, f"{name}: tokens differ from greedy decoding"
        runs[name] = {"calls_per_note": round(sum(s.calls for s in stats.values()) / notes, 3),
                      "stages": {k: round(s.calls / notes, 3) for k, s in stats.items()}}
        print(name, runs[name], flush=True)
    result = {"notes": notes, "segments": sum(map(len, clips)), "identical_tokens": True,
              "plain_calls_per_note": round(sum(s.calls for s in plain.values()) / notes, 3),
              "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "speculative_windows", **provenance(),
                                    "result": result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
