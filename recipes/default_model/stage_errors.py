"""Where an onset stage errs: greedy-decode a run's onset stage on validation segments and count
each kind of error (runtime/metrics.py `note_errors`: missed notes, predictions too early or
late, second strikes, octave errors, chord ghosts, isolated), for several checkpoints at once.

    python recipes/default_model/stage_errors.py --embeddings work/emb/prior/mix \\
        --run init=work/runs/onset-c:best --run step300=work/runs/onset-c:last \\
        --json recipes/default_model/record/lm-onset-prior-constrained/errors.json

RUN is NAME=FOLDER:best|last (best.safetensors or the latest weights of `pianolm train lm`).
Segments are spread over the validation split as the training log's decode scores are.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pianolm.export.train.embeddings import load_embeddings_index, load_items
from pianolm.export.train.examples import EmbeddingStore, build_examples, spread_examples
from pianolm.export.train.lm import (
    _segment_notes_local,
    greedy_tokens,
    load_decoder,
    predicted_notes,
)
from pianolm.runtime.metrics import ERROR_KINDS, note_errors


def stage_errors(folder: str, best: bool, embeddings: str, segments: int) -> dict[str, int]:
    decoder, _ = load_decoder(folder, best=best)
    items = load_items(embeddings, "validation", load_embeddings_index(embeddings))
    store = EmbeddingStore(items)
    examples, _ = build_examples(items, "onset", (0.0,), decoder.cfg.max_seq_len)
    chosen = spread_examples(examples, segments)
    counts = dict.fromkeys(ERROR_KINDS, 0)
    for i in range(0, len(chosen), 8):
        chunk = chosen[i:i + 8]
        emb = np.stack([store.get(e.item, e.shift, e.row) for e in chunk])
        for e, tokens in zip(chunk, greedy_tokens("onset", decoder, emb,
                                                  [e.segment for e in chunk], 384)):
            pred = predicted_notes("onset", tokens, e.segment)
            ref = _segment_notes_local(e.segment, carried=False)
            # onsets only: the onset stage predicts no offsets, so none are scored
            ref = [replace(r, offset=r.onset + 0.1) for r in ref]
            for kind, n in note_errors(pred, ref).items():
                counts[kind] += n
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embeddings", required=True)
    ap.add_argument("--run", action="append", required=True, metavar="NAME=FOLDER:best|last")
    ap.add_argument("--segments", type=int, default=24)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {}
    for spec in args.run:
        name, rest = spec.split("=", 1)
        folder, which = rest.rsplit(":", 1)
        out[name] = stage_errors(folder, which == "best", args.embeddings, args.segments)
        print(name, out[name], flush=True)
    if args.json:
        args.json.write_text(json.dumps({"segments": args.segments, "runs": out}, indent=1)
                             + "\n")


if __name__ == "__main__":
    main()
