"""What one `pianolm bench` run measures: the options, resolved into a frozen BenchConfig.

`--quick` is a smoke run (tiny preset, batch 1 and 4, two repeats): for tests and for checking
a machine before a long run. An option given explicitly always wins over what --quick implies.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pianolm.export.decoder import PRESETS
from pianolm.runtime.decode import concurrent_by_default, speculative_by_default

# In the order they are measured: the torch backends first (their systems are freed before the
# ONNX Runtime sessions open), the KV-cache one before the authors' decode so torch is warm.
BACKENDS = ("torch-cache", "torch-nocache", "ort-fp32", "ort-int8", "ort-cuda", "tensorrt")
ENCODERS = ("hppnet", "crnn")
MODES = ("hierarchical", "flat")
TORCH_DEVICES = ("cpu", "cuda")
QUICK = {"presets": ("tiny",), "batches": (1, 4), "repeats": 2, "warmup": 1}
DEFAULTS = {"presets": ("tiny", "small"), "batches": (1, 4, 16, 32), "repeats": 5, "warmup": 1}
DEFAULT_MODELS_DIR = "work/bench-models"  # git-ignored (work/)
SPECULATIVE = ("on", "auto", "off")
AGREEMENTS = (0.5, 0.8, 0.95, 1.0)


@dataclass(frozen=True)
class BenchConfig:
    presets: tuple[str, ...] = DEFAULTS["presets"]
    encoders: tuple[str, ...] = ("hppnet",)
    backends: tuple[str, ...] = BACKENDS
    batches: tuple[int, ...] = DEFAULTS["batches"]
    # Every mode and schedule is measured at these batches; at the others only the throughput
    # decode (hierarchical in the runtime's schedule, else flat), the deployment case.
    full_batches: tuple[int, ...] = (1,)
    modes: tuple[str, ...] = MODES
    repeats: int = DEFAULTS["repeats"]
    warmup: int = DEFAULTS["warmup"]
    # The authors' decode re-runs the whole prefix every step: minutes per segment at the small
    # preset. It runs at these batches only, with its own repeat count and no warm-up (torch is
    # already warm from torch-cache; first-call costs vanish next to a run that long).
    nocache_batches: tuple[int, ...] = (1,)
    nocache_repeats: int = 1
    # The encoder is timed on its own, at these batches (its cost per segment hardly moves
    # with batch on a CPU, and at 16-32 segments it is slow); decodes reuse embeddings.
    encoder_batches: tuple[int, ...] = (1, 4)
    threads: int | None = None  # intra-op threads (torch and ONNX Runtime); None = their default
    torch_device: str = "cpu"  # where torch-cache / torch-nocache run ("cuda" on a GPU machine)
    devset: Path | None = None  # None: $PIANOLM_DEVSET, else ../shared/devset
    window_stride_s: float = 0.5
    target_notes: int = 150  # the segment density; the dev set may not reach it
    identity_notes: int = 32  # note limit of the greedy identity check
    bucket: int = 32  # past-length bucket width (positions) for the per-step curves
    # passes of the read-only stream that gives each model's bandwidth floor (analytic.py),
    # timed over the fp32 and int8 steps' own byte counts
    stream_repeats: int = 7
    # Speculative decoding (export/bench/drafts.py): at the full batches, the hierarchical
    # decode again with drafts that agree with the forced notes at each rate. "on": on every
    # backend but the authors' decode; "auto": where `pianolm transcribe` would speculate (a
    # GPU backend); "off": none.
    speculative: str = "on"
    agreements: tuple[float, ...] = AGREEMENTS
    seed: int = 0
    models_dir: Path = Path(DEFAULT_MODELS_DIR)
    out: Path | None = None
    plots: bool = False
    quick: bool = False
    extra: dict = field(default_factory=dict)  # recorded as given, e.g. the raw argv

    def __post_init__(self) -> None:
        bad = [b for b in self.batches + self.full_batches + self.nocache_batches
               + self.encoder_batches if b < 1]
        if (bad or self.repeats < 1 or self.warmup < 0 or self.nocache_repeats < 1
                or self.stream_repeats < 1):
            raise ValueError("batches and repeats must be >= 1, warmup >= 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError("--threads must be >= 1")
        if self.speculative not in SPECULATIVE:
            raise ValueError(f"--speculative must be one of {list(SPECULATIVE)}")
        if not all(0.0 <= a <= 1.0 for a in self.agreements):
            raise ValueError("--agreements must lie in [0, 1]")
        if self.torch_device not in TORCH_DEVICES:
            raise ValueError(f"--torch-device must be one of {list(TORCH_DEVICES)}")
        if self.torch_device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--torch-device cuda: this torch sees no CUDA GPU")
        for name, values, known in (("preset", self.presets, PRESETS),
                                    ("encoder", self.encoders, ENCODERS),
                                    ("backend", self.backends, BACKENDS),
                                    ("mode", self.modes, MODES)):
            unknown = [v for v in values if v not in known]
            if unknown:
                raise ValueError(f"unknown {name}(s) {unknown}; choose from {list(known)}")

    @property
    def out_path(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        name = "bench_" + "_".join(self.presets + self.encoders)
        if self.quick:  # smoke runs stay out of the committed results
            return Path("work/bench") / f"{name}_quick.json"
        return Path("benchmarks/results") / f"{name}.json"

    def ordered_backends(self) -> list[str]:
        return [b for b in BACKENDS if b in self.backends]

    def runtime_schedule(self, backend: str) -> str:
        """The velocity/offset schedule `pianolm transcribe` picks for this backend on this
        machine at these threads (runtime/decode.py concurrent_by_default); throughput runs
        and the headline ratios use it."""
        device = {"ort-cuda": "cuda", "tensorrt": "tensorrt"}.get(
            backend, self.torch_device if backend.startswith("torch") else "cpu")
        return "concurrent" if concurrent_by_default(device, self.threads) else "sequential"

    def speculates(self, backend: str) -> bool:
        """Whether the speculative sweep runs on `backend`."""
        if self.speculative == "off" or backend == "torch-nocache":
            return False
        if self.speculative == "on":
            return True
        device = {"ort-cuda": "cuda", "tensorrt": "tensorrt"}.get(
            backend, self.torch_device if backend.startswith("torch") else "cpu")
        return speculative_by_default(device)

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("devset", "models_dir", "out"):
            out[key] = None if out[key] is None else str(out[key])
        return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pianolm bench",
        description="Measure the cost of decoding, side by side on identical work: the authors' "
                    "decode (PyTorch, no KV cache), PyTorch with a KV cache, ONNX Runtime fp32 "
                    "and int8 (CUDA / TensorRT where available); hierarchical and flattened; "
                    "per stage and end to end. Decoders are teacher-forced with the dev set's "
                    "reference notes, so random weights cost what trained ones do.",
        epilog="A given model folder instead (rolls-only imports included): pianolm bench "
               "--model DIR [--backend ...] [--threads N] [--devset PATH] [--repeats N] "
               "[--out JSON]; its options: pianolm bench --model DIR --help")
    ap.add_argument("--presets", nargs="+", choices=sorted(PRESETS),
                    help=f"decoder presets (default {' '.join(DEFAULTS['presets'])})")
    ap.add_argument("--encoders", nargs="+", choices=ENCODERS, default=["hppnet"])
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                    help="ort-cuda and tensorrt are skipped, with the reason recorded, where "
                         "the machine lacks them")
    ap.add_argument("--batches", nargs="+", type=int,
                    help=f"segments per batch (default {' '.join(map(str, DEFAULTS['batches']))})")
    ap.add_argument("--full-batches", nargs="+", type=int, default=[1],
                    help="batches measured in every mode and schedule (default 1); the other "
                         "batches measure throughput only (hierarchical, velocity+offset "
                         "concurrent)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--repeats", type=int, help=f"timed runs per figure (default "
                                                f"{DEFAULTS['repeats']}); medians, min, max")
    ap.add_argument("--warmup", type=int, help=f"untimed runs first (default "
                                               f"{DEFAULTS['warmup']})")
    ap.add_argument("--nocache-batches", nargs="+", type=int, default=[1],
                    help="batches the authors' decode (torch-nocache) runs at (default 1: it "
                         "takes minutes per segment)")
    ap.add_argument("--nocache-repeats", type=int, default=1)
    ap.add_argument("--encoder-batches", nargs="+", type=int, default=[1, 4],
                    help="batches the encoder is timed at (default 1 4); decodes start from "
                         "embeddings computed once")
    ap.add_argument("--threads", type=int, help="intra-op threads for torch and ONNX Runtime "
                                                "(default: theirs, all cores)")
    ap.add_argument("--torch-device", choices=TORCH_DEVICES, default="cpu",
                    help="where the PyTorch baselines run (default cpu; cuda beside ort-cuda / "
                         "tensorrt on a GPU machine)")
    ap.add_argument("--devset", type=Path, help="folder of reference notes (*.tsv) and audio "
                                                "(default $PIANOLM_DEVSET, else ../shared/devset)")
    ap.add_argument("--stream-repeats", type=int, default=7,
                    help="timed passes of the read-only stream over each model's fp32 and int8 "
                         "step bytes (weights + K/V) that gives the bandwidth floor (default 7; "
                         "median, min, max)")
    ap.add_argument("--speculative", choices=SPECULATIVE, default="on",
                    help="also decode speculatively at the full batches, with drafts agreeing "
                         "with the forced notes at each --agreements rate: on (default) every "
                         "backend but the authors' decode; auto where `pianolm transcribe` "
                         "would (GPU backends); off none")
    ap.add_argument("--agreements", nargs="+", type=float, default=list(AGREEMENTS),
                    help="fractions of draft notes that are exact, per stage (default "
                         f"{' '.join(map(str, AGREEMENTS))})")
    ap.add_argument("--identity-notes", type=int, default=32,
                    help="note limit of the greedy identity check (default 32)")
    ap.add_argument("--models-dir", type=Path, default=Path(DEFAULT_MODELS_DIR),
                    help=f"cache of random-init exports (default {DEFAULT_MODELS_DIR})")
    ap.add_argument("--out", type=Path, help="JSON to write (default benchmarks/results/"
                                             "bench_<presets>_<encoders>.json; with --quick "
                                             "work/bench/...)")
    ap.add_argument("--plots", action="store_true", help="also write PNG plots beside the JSON "
                                                         "(needs pip install 'pianolm[bench]')")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny preset, batch 1 and 4, 2 repeats (explicit options win)")
    return ap


def parse_config(argv: Sequence[str] | None = None) -> BenchConfig:
    ap = build_parser()
    args = ap.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS

    def pick(name: str):  # noqa: ANN202
        value = getattr(args, name)
        return base[name] if value is None else value

    try:
        return BenchConfig(
            presets=tuple(pick("presets")), encoders=tuple(args.encoders),
            backends=tuple(args.backends), batches=tuple(pick("batches")),
            full_batches=tuple(args.full_batches),
            modes=tuple(args.modes), repeats=pick("repeats"), warmup=pick("warmup"),
            nocache_batches=tuple(args.nocache_batches), nocache_repeats=args.nocache_repeats,
            encoder_batches=tuple(args.encoder_batches),
            threads=args.threads, torch_device=args.torch_device, devset=args.devset,
            identity_notes=args.identity_notes, stream_repeats=args.stream_repeats,
            speculative=args.speculative, agreements=tuple(args.agreements),
            models_dir=args.models_dir, out=args.out, plots=args.plots, quick=args.quick,
            extra={"argv": list(argv) if argv is not None else None})
    except ValueError as e:
        ap.error(str(e))
        raise  # unreachable: ap.error exits
