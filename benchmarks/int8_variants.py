"""int8 flavours of one step graph against its fp32 graph, timed side by side: ONNX Runtime's
MatMulNBits (8-bit weight blocks, int8 arithmetic; what `pianolm export --precision int8` writes,
block 128) at several block sizes, and ONNX Runtime dynamic quantization (MatMulInteger +
DynamicQuantizeLinear, per-channel U8U8: pianolm's int8 before). Onset-stage step, batch 1,
one-token and three-token chunks at several past lengths; rounds interleaved so every flavour
sees the same moments of a shared machine. Logit error against fp32 on the same inputs.

    pianolm bench --presets small ...   # any run of the small preset builds the fp32 folder
    python benchmarks/int8_variants.py [--model work/bench-models/small-hppnet-hier-s0/fp32] \
        [--out benchmarks/results/int8_variants_small.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

from pianolm.export.parity import random_step_inputs
from pianolm.export.precision import EXTERNAL_DATA_BYTES, _is_head, _to_int8, logger_at
from pianolm.runtime.manifest import load_manifest


def median_seconds(fn: Callable[[], object], runs: int = 15, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def dynamic_int8(src: Path, dst: Path) -> None:
    head = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node
            if _is_head(n)]
    with logger_at(None, logging.ERROR):  # it warns "consider pre-processing" via the root
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QUInt8, nodes_to_exclude=head,
                         extra_options={"MatMulConstBOnly": True})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path,
                    default=Path("work/bench-models/small-hppnet-hier-s0/fp32"))
    ap.add_argument("--blocks", type=int, nargs="+", default=[32, 128, 256])
    ap.add_argument("--pasts", type=int, nargs="+", default=[16, 128, 256])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    manifest = load_manifest(args.model)
    stage = manifest.stages[0]
    src = manifest.path(stage.step)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {"fp32": src}
        for block in args.blocks:
            graphs[f"matmulnbits-{block}"] = Path(tmp) / f"nbits{block}.onnx"
            _to_int8(src, graphs[f"matmulnbits-{block}"], EXTERNAL_DATA_BYTES, block)
        graphs["dynamic"] = Path(tmp) / "dynamic.onnx"
        dynamic_int8(src, graphs["dynamic"])
        sizes = {k: round(p.stat().st_size / 1e6, 1) for k, p in graphs.items()}
        sessions = {k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                    for k, p in graphs.items()}
    rng = np.random.default_rng(0)
    rows = []
    for chunk in (1, 3):
        for past in args.pasts:
            feeds = random_step_inputs(stage.decoder, 1, chunk, past,
                                       manifest.encoder.frames_per_segment, rng)
            times: dict[str, list[float]] = {k: [] for k in sessions}
            logits = {}
            for _ in range(args.rounds):
                for name, s in sessions.items():
                    f = {i.name: feeds[i.name] for i in s.get_inputs()}
                    logits[name] = s.run(["logits"], f)[0]
                    times[name].append(median_seconds(lambda s=s, f=f: s.run(["logits"], f)))
            ref, fp32_ms = logits["fp32"], float(np.median(times["fp32"])) * 1e3
            for name, t in times.items():
                ms = float(np.median(t)) * 1e3
                err = float(np.abs(logits[name] - ref).max() / np.abs(ref).max())
                rows.append({"graph": name, "chunk": chunk, "past": past,
                             "step_ms": round(ms, 3), "vs_fp32": round(fp32_ms / ms, 2),
                             "rounds_ms": [round(x * 1e3, 3) for x in t],
                             "logits_rel_err": round(err, 5)})
                print(f"chunk {chunk} past {past:4d} {name:16s} {ms:7.2f} ms "
                      f"({fp32_ms / ms:.2f}x fp32), logits {err:.1e} relative", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": str(args.model), "sizes_mb": sizes,
                                        "threads": args.threads, "cpu": platform.processor(),
                                        "onnxruntime": ort.__version__, "rows": rows},
                                       indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
