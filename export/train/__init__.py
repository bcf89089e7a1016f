"""pianolm.export.train: pre-train an encoder, precompute its embeddings, train the LMs.

    pianolm train encoder     --data D --encoder hppnet --out runs/hppnet      (encoder.py)
    pianolm train tune-rolls  --encoder-dir runs/hppnet --data D               (thresholds.py)
    pianolm train embed       --data D --encoder-dir runs/hppnet --out E       (embeddings.py)
    pianolm train mix         --train O:1 E:4 --validation E --out M           (embeddings.py)
    pianolm train lm          --stage onset --embeddings E --out runs/onset    (lm.py)
    pianolm train assemble    --encoder-dir runs/hppnet --onset .. --velocity .. --offset ..
                              --out runs/system                                (assembly.py)

Every training command writes a run folder with state.pt and log.jsonl and continues exactly
with `--resume`. Modules: examples (training crops, token segments, batching, sampling), loop
(the training-loop skeleton: resume, log, state.pt), targets (piano-roll targets), evaluate
(mir_eval metrics, dev set), common (schedule, resumable state, logs). Roll decoding is
runtime/rolls.py (torch-free).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from . import assembly, embeddings, encoder, lm, thresholds

    parser = argparse.ArgumentParser(prog="pianolm train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    encoder.add_cli(sub)
    thresholds.add_cli(sub)
    embeddings.add_cli(sub)
    lm.add_cli(sub)
    assembly.add_cli(sub)
    return parser


def main_train(argv: Sequence[str] | None = None) -> int:
    """`pianolm train {encoder,tune-rolls,embed,mix,lm,assemble} ...`; returns the exit status."""
    args = build_parser().parse_args(None if argv is None else list(argv))
    return int(args.func(args) or 0)


__all__ = ["build_parser", "main_train"]
