"""Which int8 form of Kong et al.'s CRNN encoder pays on ONNX Runtime's CPU provider? The fp32
encoder graph `pianolm import kong` writes, against ONNX Runtime's dynamic quantization of its
MatMuls alone (what `--precision int8` writes) and of its MatMuls and convolutions
(ConvInteger), and 8-bit weight blocks (MatMulNBits): the encoder's time for one batch of
three 10 s windows, interleaved, median of --repeats (docs/import.md, "Kong et al.'s CRNN").

    python benchmarks/probes/kong_int8_variants.py --threads 2 \
        --out benchmarks/results/kong_int8_variants_cpu.json

Random weights in Kong's layout (export/kong.py): speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization import matmul_nbits_quantizer as nbits

from pianolm.export.importing import import_kong
from pianolm.export.kong import random_kong_state, save_kong_checkpoint
from pianolm.export.precision import logger_at
from pianolm.runtime.provenance import write_report


def variants(fp32: Path, folder: Path) -> dict[str, Path]:
    out = {"fp32": fp32}
    with logger_at(None, logging.ERROR):
        for name, ops in (("int8_matmul", ["MatMul", "Gemm"]),
                          ("int8_matmul_conv", ["MatMul", "Gemm", "Conv"])):
            out[name] = folder / f"{name}.onnx"
            quantize_dynamic(fp32, out[name], weight_type=QuantType.QInt8,
                             op_types_to_quantize=ops)
        config = nbits.DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True,
                                                    accuracy_level=4, bits=8)
        quantizer = nbits.MatMulNBitsQuantizer(onnx.load(fp32), algo_config=config)
        quantizer.process()
    out["int8_matmulnbits"] = folder / "int8_matmulnbits.onnx"
    onnx.save(quantizer.model.model, out["int8_matmulnbits"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/"
                                                      "kong_int8_variants_cpu.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_kong_checkpoint(random_kong_state(seed=0), folder / "kong.pth")
        model = import_kong(folder / "kong.pth", folder / "model")
        graphs = variants(model.path(model.encoder.graph), folder)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        sessions = {name: ort.InferenceSession(str(path), options,
                                               providers=["CPUExecutionProvider"])
                    for name, path in graphs.items()}
        audio = (0.1 * np.random.default_rng(0).normal(size=(3, 160000))).astype(np.float32)
        seconds: dict[str, list[float]] = {name: [] for name in sessions}
        for session in sessions.values():  # warm-up
            session.run(None, {"waveform": audio})
        for _ in range(args.repeats):
            for name, session in sessions.items():
                t0 = time.perf_counter()
                session.run(None, {"waveform": audio})
                seconds[name].append(time.perf_counter() - t0)
    median = {name: round(float(np.median(s)), 3) for name, s in seconds.items()}
    result = {"threads": args.threads, "windows": 3, "repeats": args.repeats,
              "median_s": median,
              "vs_fp32": {n: round(m / median["fp32"], 2) for n, m in median.items()}}
    write_report(args.out, "kong_int8_variants", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
