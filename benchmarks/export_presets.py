"""Export presets x encoders x precisions (random weights) and report graph sizes, export time
and ONNX Runtime vs PyTorch parity per graph. Not part of CI: the base preset's export and
parity take minutes on a CPU.

    python benchmarks/export_presets.py --presets tiny small --encoders hppnet crnn \
        --out benchmarks/results/export_presets.json

Decoders get `sharpen`ed weights (O(1) scale, as tests/test_decoder.py does) unless --lm-init:
the LM init (std 0.02) gives near-uniform logits, which hide fp16/int8 error. Parity: batch 1
and 4, past 7, chunk 3; the encoder on a 2 s clip (its time axis is dynamic).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from pianolm.export.decoder import PRESETS, sharpen
from pianolm.export.onnx_export import EX_SAMPLES, export_model
from pianolm.export.parity import graph_parity
from pianolm.export.precision import convert_model
from pianolm.export.system import SystemConfig, TranscriptionSystem
from pianolm.export.tensorrt import check_model
from pianolm.runtime.manifest import load_manifest


def run(preset: str, encoder: str, precisions: list[str], root: Path, lm_init: bool,
        batches: list[int]) -> list[dict]:
    torch.manual_seed(0)
    system = TranscriptionSystem(SystemConfig(encoder=encoder, decoder=preset)).eval()
    if not lm_init:
        for i, dec in enumerate(system.decoders.values()):
            sharpen(dec, seed=i)
    fp32 = root / f"{preset}-{encoder}-fp32"
    t0 = time.perf_counter()
    export_model(system, fp32, seed=0, metadata={"preset": preset})
    export_s = time.perf_counter() - t0
    rows = []
    for precision in precisions:
        folder = fp32
        t0 = time.perf_counter()
        if precision != "fp32":
            folder = root / f"{preset}-{encoder}-{precision}"
            convert_model(fp32, folder, precision)
        convert_s = time.perf_counter() - t0
        manifest = load_manifest(folder)
        sizes = {name: g.bytes for name, g in manifest.graphs().items()}
        parity = [p for b in batches for p in graph_parity(system, folder, b, samples=EX_SAMPLES)]
        trt = check_model(folder)
        row = {"preset": preset, "encoder": encoder, "precision": precision,
               "export_s": round(export_s, 1), "convert_s": round(convert_s, 1),
               "bytes": sizes, "total_mb": round(sum(sizes.values()) / 1e6, 2),
               "parity": [{"graph": p.graph, "output": p.output, "batch": p.batch,
                           "max_abs": p.max_abs, "max_rel": p.max_rel} for p in parity],
               "tensorrt_check": trt}
        rows.append(row)
        print(f"\n{preset} / {encoder} / {precision}: {row['total_mb']} MB "
              f"(export {export_s:.0f} s, convert {convert_s:.0f} s), TensorRT check: "
              f"{'ok' if not trt else f'{len(trt)} problems'}", flush=True)
        for name, size in sizes.items():
            worst = [p for p in parity if p.graph == name]
            abs_err = max(p.max_abs for p in worst)
            rel_err = max(p.max_rel for p in worst)
            print(f"  {name:<18} {size / 1e6:8.2f} MB  max abs {abs_err:.2e}  rel {rel_err:.2e}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny"], choices=sorted(PRESETS))
    ap.add_argument("--encoders", nargs="+", default=["hppnet", "crnn"],
                    choices=["hppnet", "crnn"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "int8"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--lm-init", action="store_true", help="keep the LM init (std 0.02)")
    ap.add_argument("--keep", help="keep the exported folders here (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        for preset in args.presets:
            for encoder in args.encoders:
                rows += run(preset, encoder, args.precisions, root, args.lm_init, args.batches)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpu": platform.processor() or platform.machine()},
            "weights": "LM init" if args.lm_init else "sharpened random", "results": rows},
            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
