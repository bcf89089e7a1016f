"""`pianolm bench`: the cost of decoding, measured side by side on identical work (README
"Benchmark").

    pianolm bench --presets tiny small --batches 1 4 16 --repeats 3 --plots \\
        --out benchmarks/results/NAME.json

Modules, one concern each:
  config.py    options -> BenchConfig
  workload.py  dev-set reference notes -> densest 10 s windows -> per-stage token sequences
  forcing.py   teacher forcing through the runtime's own decode loop (ForcedBackend)
  models.py    random-init systems, cached exports (work/bench-models/), backends by name
  measure.py   timed runs -> medians / min / max, per-step latency by past length, peak RSS
  analytic.py  FLOPs and bytes per step; the floor: a read-only stream of a step's bytes, timed
  identity.py  greedy decode through the runtime and the PyTorch references, token for token
  summary.py   headline ratios next to the issue's targets
  plots.py     PNGs beside the JSON (matplotlib: the `bench` extra)
  runner.py    the whole run -> one JSON report
  folder.py    `pianolm bench --model DIR`: a given model folder (rolls-only imports included),
               its encoder, roll / LM decoding and whole transcription timed on the dev set
"""

from __future__ import annotations

from collections.abc import Sequence


def main_bench(argv: Sequence[str] | None = None) -> int:
    """`pianolm bench`: parse options, run, write the JSON (and plots); 0 on success."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--model" or a.startswith("--model=") for a in args):
        from .folder import main_folder_bench  # a given folder: no preset models are built

        return main_folder_bench(args)

    from .config import parse_config
    from .runner import run_bench
    from .workload import WorkloadError

    cfg = parse_config(argv)
    if cfg.plots:
        try:
            import matplotlib  # noqa: F401
        except ModuleNotFoundError:
            print("pianolm bench: error: --plots needs matplotlib: pip install 'pianolm[bench]'",
                  file=sys.stderr)
            return 2
    try:
        run_bench(cfg)
    except WorkloadError as e:
        print(f"pianolm bench: error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["main_bench"]
