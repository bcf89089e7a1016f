"""TensorRT backend: runtime/backend.py's Backend / StageSession over the engines that
`pianolm build-engines` writes (runtime/trt_build.py).

Engines: one per graph, named by trt_build.engine_file (onset_step.onnx -> onset_step.engine), in
the model folder unless built elsewhere, with one optimization profile each; `tensorrt.json` beside
them records the TensorRT version and the profile. The profile bounds what a session can do:
batch, tokens per step (chunk) and cache length (past); the backend checks every call against
it and says which `build-engines` range to widen.

Device memory, per session: the segment's cross K/V, and every layer's K and V each in two
buffers of the largest cache the step engine's profile allows ([B, H, max past + chunk, Dh]).
A step reads the past from one buffer and writes the present into the other; a contiguous
[B, H, P, Dh] tensor is a prefix of its buffer, so the two simply swap roles after each step and
nothing is allocated per step. Per step only tokens, positions and key_mask go up and the
logits come down, with one stream synchronisation. `keep(rows)` gathers the kept rows with
device-to-device 2-D copies (`select_copies`).

The step bookkeeping (chunk checks, RoPE positions, key mask, keep) is StepSession's
(runtime/step_session.py); only the cache and `_run` are TensorRT's. tensorrt and cuda-python
are imported by the constructor, which says what to install when either is missing.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backend import BackendUnavailable, check_audio, check_embeddings
from .graphs import cache_shape
from .manifest import (
    INT8_IS_ORT_ONLY,
    DecoderSpec,
    GraphSpec,
    Manifest,
    ManifestError,
    load_manifest,
)
from .step_session import StepSession
from .trt_build import BUILD_RECORD, engine_file

Shape = tuple[int, ...]
INSTALL_HINT = ("the TensorRT backend needs TensorRT's Python API and cuda-python on a machine "
                "with an NVIDIA GPU: pip install 'pianolm[gpu]' and pip install "
                "--extra-index-url https://pypi.nvidia.com tensorrt-cu12 (or tensorrt-cu13; "
                "TensorRT 10.x or 11.x)")


# ---------------------------------------------------------------------------------------------
# Pure bookkeeping: file names, profile ranges, shapes, buffer sizes, row gathers


def engine_paths(manifest: Manifest, folder: Path, record: Mapping[str, Any]) -> dict[str, Path]:
    """Graph name -> engine path: from the build record's `engines` map when it has one, else
    by build-engines' naming rule."""
    names = record.get("engines") or {}
    return {name: folder / names.get(name, engine_file(graph))
            for name, graph in manifest.graphs().items()}


def read_build_record(folder: Path, version: str, model_dir: str | Path) -> dict[str, Any]:
    """tensorrt.json, checked: engines only load in the TensorRT version that built them."""
    path = folder / BUILD_RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: unreadable ({e})") from None
    built = record.get("tensorrt")
    if built and built != version:
        raise ManifestError(f"{path}: engines built with TensorRT {built}, which TensorRT "
                            f"{version} cannot load: rebuild them with `pianolm build-engines "
                            f"{model_dir}`")
    return record


@dataclass(frozen=True)
class ProfileRange:
    """An engine input's optimization-profile bounds (min and max shape)."""

    low: Shape
    high: Shape

    def admits(self, shape: Shape) -> bool:
        return len(shape) == len(self.low) and all(
            lo <= d <= hi for d, lo, hi in zip(shape, self.low, self.high))


def check_shapes(engine: str, shapes: Mapping[str, Shape],
                 ranges: Mapping[str, ProfileRange]) -> None:
    """Refuse input shapes outside the engine's profile, naming the tensors and ranges."""
    bad = [f"{name} {list(shape)} not within {list(ranges[name].low)}..{list(ranges[name].high)}"
           for name, shape in shapes.items() if not ranges[name].admits(shape)]
    if bad:
        raise ValueError(f"{engine}: {'; '.join(bad)} (the engine's optimization profile: "
                         f"rebuild with wider `pianolm build-engines --batch/--chunk/--past "
                         f"MIN/OPT/MAX` ranges)")


def kv_shape(decoder: DecoderSpec, batch: int, length: int) -> Shape:
    """One layer's K or V, [B, H, length, Dh]: past/present (length P) and cross V (T); a
    cross K^T [B, H, Dh, T] has as many elements."""
    return (batch, decoder.n_heads, length, decoder.head_dim)


def step_shapes(decoder: DecoderSpec, batch: int, chunk: int, past: int, frames: int
                ) -> dict[str, Shape]:
    """The step graph's input shapes for a chunk of `chunk` tokens after `past` positions."""
    host = {"tokens": (batch, chunk), "positions": (batch, chunk),
            "key_mask": (batch, past + chunk), "query_ticks": (batch, chunk)}
    return {**{name: host[name] for name in decoder.step_inputs},
            **{name: cache_shape(name, batch, decoder.n_heads, decoder.head_dim, length)
               for names, length in ((decoder.past_names, past), (decoder.cross_names, frames))
               for name in names}}


def logits_shape(decoder: DecoderSpec, batch: int, chunk: int, every_position: bool) -> Shape:
    """The step graph's logits: after every chunk position (format 6), or the last only."""
    return (batch, chunk, decoder.vocab_size) if every_position else (batch, decoder.vocab_size)


def cache_capacity(ranges: Mapping[str, ProfileRange], decoder: DecoderSpec) -> int:
    """The longest present K/V a step engine can write: max past + max chunk, and no longer
    than its key mask."""
    past = ranges[decoder.past_names[0]].high[2]
    return min(ranges["key_mask"].high[1], past + ranges["tokens"].high[1])


def nbytes(shape: Shape, dtype: str | np.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


@dataclass(frozen=True)
class Copy2D:
    """One cudaMemcpy2D: `height` runs of `width` bytes, from src + src_offset (runs
    src_pitch apart) to dst + dst_offset (runs dst_pitch apart)."""

    src_offset: int
    dst_offset: int
    width: int
    height: int
    src_pitch: int
    dst_pitch: int


def select_copies(rows: Sequence[int], batch: int, outer: int, inner_bytes: int
                  ) -> list[Copy2D]:
    """Copies that gather batch rows `rows` of a contiguous [outer, batch, inner] tensor into a
    contiguous [outer, len(rows), inner] one: one 2-D copy (outer runs) per stretch of rows
    that are consecutive both in the source and in `rows`."""
    copies: list[Copy2D] = []
    if inner_bytes == 0 or outer == 0:
        return copies
    start = 0
    for j in range(1, len(rows) + 1):
        if j == len(rows) or rows[j] != rows[j - 1] + 1:
            copies.append(Copy2D(int(rows[start]) * inner_bytes, start * inner_bytes,
                                 (j - start) * inner_bytes, outer, batch * inner_bytes,
                                 len(rows) * inner_bytes))
            start = j
    return copies


def engine_io_problems(graph: GraphSpec, io: Mapping[str, tuple[bool, str]]) -> list[str]:
    """Differences between an engine's IO tensors {name: (is_input, dtype)} and the manifest."""
    want = {t.name: (True, t.dtype) for t in graph.inputs}
    want.update({t.name: (False, t.dtype) for t in graph.outputs})
    problems = [f"{'input' if w[0] else 'output'} {name} ({w[1]}) missing"
                for name, w in want.items() if name not in io]
    problems += [f"{name} is an {'input' if io[name][0] else 'output'} of {io[name][1]}, the "
                 f"manifest says {'input' if w[0] else 'output'} of {w[1]}"
                 for name, w in want.items() if name in io and io[name] != w]
    problems += [f"unexpected tensor {name}" for name in io if name not in want]
    return problems


# ---------------------------------------------------------------------------------------------
# CUDA through cuda-python


def _import_gpu() -> tuple[Any, Any]:
    """tensorrt and cuda-python's runtime module (cuda.bindings.runtime, or cuda.cudart before
    cuda-python 12.6)."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or OSError from missing CUDA libraries
        raise BackendUnavailable(f"{INSTALL_HINT} (import tensorrt: {type(e).__name__}: "
                                 f"{e})") from None
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except Exception as e:
            raise BackendUnavailable(f"{INSTALL_HINT} (import cuda-python: "
                                     f"{type(e).__name__}: {e})") from None
    return trt, cudart


class Cuda:
    """The few CUDA runtime calls the backend makes, each checked (cuda-python returns
    (error, *values) tuples rather than raising)."""

    def __init__(self, cudart: Any, device_id: int) -> None:
        self.rt = cudart
        self.device_id = device_id
        self.h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.d2d = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice

    def call(self, name: str, *args: Any) -> Any:
        err, *values = getattr(self.rt, name)(*args)
        if err != self.rt.cudaError_t.cudaSuccess:
            _, text = self.rt.cudaGetErrorString(err)
            raise RuntimeError(f"CUDA {name} failed: {getattr(err, 'name', err)}: "
                               f"{text.decode(errors='replace')}")
        return values[0] if len(values) == 1 else values

    def malloc(self, size: int) -> int:
        """On our device: the current device is per host thread, and decode_batch starts the
        velocity stage from a thread of its own."""
        self.call("cudaSetDevice", self.device_id)
        return int(self.call("cudaMalloc", max(size, 1)))

    def free(self, ptr: int) -> None:
        """For finalizers: never raises (at interpreter exit CUDA may be gone already)."""
        try:
            self.rt.cudaFree(ptr)
        except Exception:  # noqa: BLE001
            pass

    def upload(self, dst: DeviceBuffer, array: np.ndarray, stream: Any) -> None:
        array = np.ascontiguousarray(array)
        if array.nbytes > dst.nbytes:
            raise ValueError(f"{array.nbytes} bytes do not fit a {dst.nbytes}-byte buffer")
        if array.nbytes:
            self.call("cudaMemcpyAsync", dst.ptr, array.ctypes.data, array.nbytes, self.h2d,
                      stream)

    def download(self, array: np.ndarray, src: DeviceBuffer, stream: Any) -> None:
        """Into a C-contiguous array; complete once the stream is synchronised."""
        if array.nbytes:
            self.call("cudaMemcpyAsync", array.ctypes.data, src.ptr, array.nbytes, self.d2h,
                      stream)

    def gather(self, copies: Sequence[Copy2D], src: DeviceBuffer, dst: DeviceBuffer,
               stream: Any) -> None:
        for c in copies:
            self.call("cudaMemcpy2DAsync", dst.ptr + c.dst_offset, c.dst_pitch,
                      src.ptr + c.src_offset, c.src_pitch, c.width, c.height, self.d2d, stream)


class DeviceBuffer:
    """cudaMalloc'd memory, freed when the last reference goes."""

    def __init__(self, cuda: Cuda, size: int) -> None:
        self.nbytes = size
        self.ptr = cuda.malloc(size)
        weakref.finalize(self, cuda.free, self.ptr)


class Engine:
    """A deserialized engine with one execution context, stream and lock.

    decode_batch runs the velocity and offset stages in two threads: their engines run side by
    side, while two sessions of one stage take turns on its context (the lock). Every use
    synchronises its stream before releasing the lock, so scratch buffers are reusable.
    """

    def __init__(self, trt: Any, runtime: Any, cuda: Cuda, path: Path, name: str,
                 graph: GraphSpec, model_dir: str | Path) -> None:
        self.name = name
        self.cuda = cuda
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ManifestError(f"{path}: TensorRT {trt.__version__} cannot load this engine "
                                f"(another TensorRT version or GPU built it?): rebuild with "
                                f"`pianolm build-engines {model_dir}`")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        io = {n: (self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT,
                  _dtype_name(trt, self.engine.get_tensor_dtype(n))) for n in names}
        problems = engine_io_problems(graph, io)
        if problems:
            raise ManifestError(f"{path}: engine tensors differ from the manifest's graph "
                                f"{graph.file}: {'; '.join(problems)}")
        self.dtypes = {n: io[n][1] for n in names}
        self.ranges: dict[str, ProfileRange] = {}
        for t in graph.inputs:
            low, _, high = self.engine.get_tensor_profile_shape(t.name, 0)
            self.ranges[t.name] = ProfileRange(tuple(low), tuple(high))
        self.context = self.engine.create_execution_context()
        self.stream = cuda.call("cudaStreamCreate")
        weakref.finalize(self, cuda.rt.cudaStreamDestroy, self.stream)
        self.lock = threading.Lock()
        self.scratch: dict[str, DeviceBuffer] = {}

    @contextmanager
    def active(self) -> Iterator[None]:
        """Hold the context, on our device (set per use: it is per host thread)."""
        with self.lock:
            self.cuda.call("cudaSetDevice", self.cuda.device_id)
            yield

    def buffer(self, name: str, size: int) -> DeviceBuffer:
        """A grow-only scratch buffer, reused across calls (under `active`)."""
        buf = self.scratch.get(name)
        if buf is None or buf.nbytes < size:
            buf = self.scratch[name] = DeviceBuffer(self.cuda, size)
        return buf

    def set_shapes(self, shapes: Mapping[str, Shape]) -> None:
        check_shapes(self.name, shapes, self.ranges)
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, shape):
                raise RuntimeError(f"{self.name}: TensorRT refused input shape {name} "
                                   f"{list(shape)}")

    def tensor_shape(self, name: str) -> Shape:
        """A tensor's shape under the input shapes set (outputs' follow from them)."""
        return tuple(self.context.get_tensor_shape(name))

    def execute(self, buffers: Mapping[str, DeviceBuffer]) -> None:
        """Enqueue with every IO tensor at its buffer, after checking each tensor fits (an
        engine writing past a buffer's end would corrupt device memory silently)."""
        if set(buffers) != set(self.dtypes):
            raise ValueError(f"{self.name}: buffers for {sorted(buffers)}, engine tensors "
                             f"{sorted(self.dtypes)}")
        for name, buf in buffers.items():
            need = nbytes(self.tensor_shape(name), self.dtypes[name])
            if need > buf.nbytes:
                raise ValueError(f"{self.name}: {name} needs {need} bytes, its buffer has "
                                 f"{buf.nbytes}")
            if not self.context.set_tensor_address(name, buf.ptr):
                raise RuntimeError(f"{self.name}: TensorRT refused the address of {name}")
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError(f"{self.name}: TensorRT execute_async_v3 failed (see its log)")

    def sync(self) -> None:
        self.cuda.call("cudaStreamSynchronize", self.stream)


def _dtype_name(trt: Any, dtype: Any) -> str:
    try:
        return np.dtype(trt.nptype(dtype)).name
    except TypeError:  # a TensorRT type numpy lacks (bf16, fp8, ...): never in a manifest
        return str(dtype)


# ---------------------------------------------------------------------------------------------
# Sessions


class TrtKVCache:
    """One session's device state: every layer's cross K/V, its K and V each in two cache
    buffers, and the step's input/output buffers, all sized once for the session's batch and
    the profile's maxima."""

    def __init__(self, engine: Engine, decoder: DecoderSpec, dtype: str, batch: int,
                 frames: int, every_position: bool) -> None:
        self.engine = engine
        self.decoder = decoder
        self.dtype = dtype
        self.frames = frames
        self.capacity = cache_capacity(engine.ranges, decoder)
        self.batch = batch
        self.length = 0  # P: positions in the cache
        self.current = 0  # which buffer of each pair holds the past
        cuda = engine.cuda
        self.cross = [DeviceBuffer(cuda, nbytes(self._cross_shape(name, batch), dtype))
                      for name in decoder.cross_names]
        size = nbytes(kv_shape(decoder, batch, self.capacity), dtype)
        self.pairs = [[DeviceBuffer(cuda, size), DeviceBuffer(cuda, size)]
                      for _ in decoder.past_names]
        chunk = engine.ranges["tokens"].high[1]
        host = step_shapes(decoder, batch, chunk, self.capacity - chunk, frames)
        self.io = {name: DeviceBuffer(cuda, nbytes(shape, engine.dtypes[name])) for name, shape in (
            *((name, host[name]) for name in decoder.step_inputs),
            ("logits", logits_shape(decoder, batch, chunk, every_position)))}

    def _cross_shape(self, name: str, batch: int) -> Shape:
        d = self.decoder
        return cache_shape(name, batch, d.n_heads, d.head_dim, self.frames)

    def buffers(self) -> dict[str, DeviceBuffer]:
        """The step engine's K/V tensors: past from the current pair member, present into the
        other."""
        d, now, nxt = self.decoder, self.current, 1 - self.current
        return {**{name: pair[now] for name, pair in zip(d.past_names, self.pairs)},
                **{name: pair[nxt] for name, pair in zip(d.present_names, self.pairs)},
                **dict(zip(d.cross_names, self.cross))}

    def advance(self, chunk: int) -> None:
        self.length += chunk
        self.current = 1 - self.current

    def select(self, rows: np.ndarray) -> TrtKVCache:
        """Gather rows on the device: the cache into the other buffer of each pair, cross K/V
        into new buffers. Every tensor is [B, ...] with the batch outermost."""
        d, e, cuda = self.decoder, self.engine, self.engine.cuda
        row = d.n_heads * d.head_dim * np.dtype(self.dtype).itemsize
        kv = select_copies(rows, self.batch, 1, row * self.length)
        new_cross = [DeviceBuffer(cuda, nbytes(self._cross_shape(name, len(rows)), self.dtype))
                     for name in d.cross_names]
        with e.active():
            nxt = 1 - self.current
            for pair in self.pairs:
                cuda.gather(kv, pair[self.current], pair[nxt], e.stream)
            for name, old, new in zip(d.cross_names, self.cross, new_cross):
                per_row = nbytes(self._cross_shape(name, 1), self.dtype)
                cuda.gather(select_copies(rows, self.batch, 1, per_row), old, new, e.stream)
            e.sync()
        self.current, self.cross, self.batch = nxt, new_cross, len(rows)
        return self


class TensorRTStageSession(StepSession):
    """StepSession's bookkeeping; the step runs on a TensorRT engine over a TrtKVCache."""

    cache: TrtKVCache
    session: Engine

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        c, e, cuda = self.cache, self.session, self.session.cuda
        batch, chunk = feeds["tokens"].shape
        shapes = step_shapes(self.decoder, batch, chunk, c.length, c.frames)
        check_shapes(e.name, shapes, e.ranges)  # before anything is written to the device
        logits = np.empty(logits_shape(self.decoder, batch, chunk, self.every_position),
                          dtype=np.float32)
        with e.active():
            for name, array in feeds.items():
                cuda.upload(c.io[name], array.astype(e.dtypes[name], copy=False), e.stream)
            e.set_shapes(shapes)
            e.execute({**c.io, **c.buffers()})
            cuda.download(logits, c.io["logits"], e.stream)
            e.sync()
        c.advance(chunk)
        return logits


class TensorRTBackend:
    """Backend protocol over an exported model folder and its TensorRT engines.

    engines_dir: where `pianolm build-engines` wrote the engines (default: the model folder).
    device_id: the CUDA device the engines run on.
    """

    def __init__(self, model_dir: str | Path, engines_dir: str | Path | None = None,
                 device_id: int = 0) -> None:
        self.manifest: Manifest = load_manifest(model_dir)
        self.stages: tuple[str, ...] = self.manifest.stage_names
        self.sample_rate = self.manifest.sample_rate
        self.segment_samples = self.manifest.segment_samples
        self.precision = self.manifest.precision
        if self.precision == "int8":
            raise ManifestError(f"{model_dir}: {INT8_IS_ORT_ONLY}, so int8 exports have no "
                                f"TensorRT engines: use an fp16 or fp32 export, or the cpu "
                                f"backend")
        trt, cudart = _import_gpu()
        self.cuda = Cuda(cudart, device_id)
        try:
            count = self.cuda.call("cudaGetDeviceCount")
        except RuntimeError as e:
            raise BackendUnavailable(f"no usable CUDA GPU for TensorRT ({e})") from None
        if not 0 <= device_id < count:
            raise BackendUnavailable(f"CUDA device {device_id} requested, {count} visible")
        self.cuda.call("cudaSetDevice", device_id)
        folder = Path(engines_dir) if engines_dir is not None else Path(model_dir)
        record = read_build_record(folder, trt.__version__, model_dir)
        paths = engine_paths(self.manifest, folder, record)
        missing = sorted(p.name for p in paths.values() if not p.is_file())
        if missing:
            raise ManifestError(f"{folder}: no TensorRT engine(s) {missing}: build them with "
                                f"`pianolm build-engines {model_dir}`")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        graphs = self.manifest.graphs()
        self.engines = {name: Engine(trt, self._runtime, self.cuda, path, name, graphs[name],
                                     model_dir) for name, path in paths.items()}

    def encode(self, audio: np.ndarray) -> np.ndarray:
        """float32 waveform [B, segment_samples] -> embeddings [B, T, E] float32."""
        return self._encode(audio, with_rolls=False)[0]

    def encode_with_rolls(self, audio: np.ndarray, whole: bool = True
                          ) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        """`encode`, plus the rolls of the same run (runtime/backend.py RollBackend). The
        engines' profiles hold whole segments only: a shorter window is refused."""
        return self._encode(audio, with_rolls=True)

    def _encode(self, audio: np.ndarray, with_rolls: bool
                ) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        audio = check_audio(audio, self.segment_samples)
        e = self.engines["encoder"]
        # every output needs an address, rolls included; only the wanted ones are downloaded
        outputs = [t.name for t in self.manifest.encoder.graph.outputs]
        wanted = outputs if with_rolls else ["embeddings"]
        with e.active():
            src = e.buffer("waveform", audio.nbytes)
            self.cuda.upload(src, audio, e.stream)
            e.set_shapes({"waveform": audio.shape})
            host = {n: np.empty(e.tensor_shape(n), dtype=e.dtypes[n]) for n in outputs}
            dst = {n: e.buffer(n, a.nbytes) for n, a in host.items()}
            e.execute({"waveform": src, **dst})
            for n in wanted:
                self.cuda.download(host[n], dst[n], e.stream)
            e.sync()
        out = {n: host[n].astype(np.float32, copy=False) for n in wanted}
        emb = out.pop("embeddings")
        return emb, (out or None) if with_rolls else None

    def start(self, stage: str, embeddings: np.ndarray) -> TensorRTStageSession:
        spec, emb = check_embeddings(self.manifest, stage, embeddings)
        batch, frames = emb.shape[:2]
        step = self.engines[f"{stage}.step"]
        # batch and frames must suit the step engine before its buffers are sized for them
        check_shapes(step.name, step_shapes(spec.decoder, batch, 1, 0, frames), step.ranges)
        cache = TrtKVCache(step, spec.decoder, step.dtypes[spec.decoder.past_names[0]], batch,
                           frames, spec.every_position)
        e = self.engines[f"{stage}.cross_kv"]
        with e.active():
            src = e.buffer("embeddings", emb.nbytes)
            self.cuda.upload(src, emb, e.stream)
            e.set_shapes({"embeddings": emb.shape})
            e.execute({"embeddings": src, **dict(zip(spec.decoder.cross_names, cache.cross))})
            e.sync()  # the step engine reads cross K/V on its own stream
        return TensorRTStageSession(step, spec, cache)
