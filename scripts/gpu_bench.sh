#!/usr/bin/env bash
# The GPU benchmark: `pianolm bench` on a CUDA 13 machine that has no network (torch with CUDA
# and Python 3.12 there, nothing else of ours). Two halves:
#
#   bash scripts/gpu_bench.sh prepare
#       Here, with network. Into .gpu/ (git-ignored): the wheels the GPU machine lacks
#       (onnxruntime-gpu for CUDA 13, soundfile, soxr, mido; cp312 manylinux), the
#       onnxruntime-gpu wheel cut into 20 MiB parts (.gpu/ort/), and the dev set's
#       reference notes and audio (.gpu/devset/: the bench drives the decoders with the notes).
#
#   bash scripts/gpu_bench.sh run OUT_DIR [pianolm bench options...]
#       On the GPU machine, from the repository root, once every part is there: joins the
#       parts, installs the wheels and pianolm into /tmp/site (no network, no deps resolved),
#       records whether TensorRT is importable, then runs the benchmark: the PyTorch baselines
#       on CUDA (torch-cache, and the authors' decode at batch 1), ONNX Runtime CUDA with IO
#       binding and TensorRT where importable; small and base presets, batch 1 4 16 32. Writes
#       OUT_DIR/bench_gpu.json (machine, GPU model, versions, every figure, summary) and
#       OUT_DIR/gpu_env.txt. Options after OUT_DIR replace the default bench options.
#
# With the device tool, whose calls carry at most 64 MiB: one call per .gpu/ort/ part (carry
# [".gpu/ort/PART"], command `true`: parts stay on the machine while it is warm), then one
# call carrying .gpu/wheels and .gpu/devset with the command `bash scripts/gpu_bench.sh run
# $OUT`. Commit OUT's bench_gpu.json under benchmarks/results/ with the GPU named.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=.gpu
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.31.1}  # CUDA 13 (METADATA: nvidia-cuda-runtime~=13.0)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

download() {  # cp312 x86-64 wheels, no dependencies resolved
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d "$@"
}

case "${1:-}" in
prepare)
  grep -qx '/.gpu/' .gitignore || { echo "add /.gpu/ to .gitignore first" >&2; exit 1; }
  rm -rf "$STAGE" && mkdir -p "$STAGE/wheels" "$STAGE/ort" "$STAGE/devset" "$STAGE/tmp"
  download "$STAGE/wheels" soundfile soxr mido
  download "$STAGE/tmp" "$ORT_GPU"
  whl=$(ls "$STAGE"/tmp/onnxruntime_gpu-*.whl)
  basename "$whl" > "$STAGE/ort/WHEEL"
  sha256sum "$whl" | cut -d' ' -f1 > "$STAGE/ort/SHA256"
  split -b 20M -d "$whl" "$STAGE/ort/part-"  # + the 38 MB tree < 64 MiB per device call
  rm -rf "$STAGE/tmp"
  devset=${PIANOLM_DEVSET:-../shared/devset}
  cp "$devset"/*.tsv "$devset"/*.wav "$devset"/*.flac "$STAGE/devset/" 2>/dev/null || true
  ls -la "$STAGE"/*
  ;;
run)
  out=${2:?usage: scripts/gpu_bench.sh run OUT_DIR [bench options]}
  shift 2
  mkdir -p "$out"
  whl=/tmp/$(cat "$STAGE/ort/WHEEL")
  cat "$STAGE"/ort/part-* > "$whl"
  echo "$(cat "$STAGE/ort/SHA256")  $whl" | sha256sum -c --quiet
  # The image's CPU onnxruntime provides the same module: the GPU build goes first on the path.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$whl" "$STAGE"/wheels/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --target /tmp/site .
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    python3 -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())'
    python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'
    python3 -c 'import tensorrt as t; print("tensorrt", t.__version__)' 2>&1 | tail -1 || true
    echo "ldconfig nvinfer: $(ldconfig -p | grep -c nvinfer || true) entries"
  } | tee "$out/gpu_env.txt"
  if [ "$#" -eq 0 ]; then
    set -- --presets small base --batches 1 4 16 32 --repeats 3 --modes hierarchical \
      --backends torch-cache torch-nocache ort-cuda tensorrt --torch-device cuda
  fi
  python3 -m pianolm.runtime.cli bench --devset "$STAGE/devset" --models-dir /tmp/bench-models \
    --out "$out/bench_gpu.json" "$@"
  ;;
*)
  sed -n '2,22p' "$0"
  exit 2
  ;;
esac
