"""TensorRTBackend (runtime/trt_backend.py).

Everywhere: its bookkeeping against the exporter's own rules, with no TensorRT: engine file names
against `pianolm build-engines`' (runtime/trt_build.py), the build record's version check, step
shapes and cache buffer sizes against the optimization profile build-engines uses, the
device-side row gather (`select_copies`, run here through a byte-level emulation of
cudaMemcpy2D's documented semantics), engine IO against the manifest, and the one-line errors
when TensorRT is missing or the folder is int8.

Where `tensorrt`, cuda-python and a GPU are present: engines are built for the tiny exported
model and the decode must be token-identical to OrtBackend at batch 1 and 4 (else these tests
skip and print why).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pianolm.runtime import trt_build, vocab
from pianolm.runtime.backend import BackendUnavailable
from pianolm.runtime.manifest import ManifestError
from pianolm.runtime.trt_backend import (
    BUILD_RECORD,
    Copy2D,
    ProfileRange,
    TensorRTBackend,
    cache_capacity,
    check_shapes,
    engine_file,
    engine_io_problems,
    engine_paths,
    kv_shape,
    nbytes,
    read_build_record,
    select_copies,
    step_shapes,
)
from tests.test_export_manifest import T, synthetic_model


@pytest.fixture
def manifest(tmp_path):
    return synthetic_model(tmp_path / "m")


def _profile_ranges(manifest, graph, **dims) -> dict[str, ProfileRange]:
    """The ranges build-engines gives this graph's inputs (runtime/trt_build.py)."""
    profile = trt_build.default_profile(manifest)
    profile.update(dims)
    shapes = trt_build.input_shapes(graph.inputs, profile)
    return {name: ProfileRange(lo, hi) for name, (lo, _, hi) in shapes.items()}


# ---------------------------------------------------------------------------------------------
# Files


def test_engine_names_are_build_engines_names(manifest, tmp_path):
    graphs = manifest.graphs()
    for graph in graphs.values():
        assert engine_file(graph) == trt_build.engine_file(graph)
    assert engine_file(graphs["onset.step"]) == "onset_step.engine"
    paths = engine_paths(manifest, tmp_path, {})
    assert paths["encoder"] == tmp_path / "encoder.engine" and len(paths) == 7
    moved = engine_paths(manifest, tmp_path, {"engines": {"encoder": "enc-b8.engine"}})
    assert moved["encoder"] == tmp_path / "enc-b8.engine"
    assert moved["offset.step"] == tmp_path / "offset_step.engine"


def test_build_record_version_must_match(tmp_path):
    assert read_build_record(tmp_path, "10.9.0", "m") == {}
    (tmp_path / BUILD_RECORD).write_text(json.dumps({"tensorrt": "10.9.0", "engines": {}}))
    assert read_build_record(tmp_path, "10.9.0", "m")["tensorrt"] == "10.9.0"
    with pytest.raises(ManifestError, match=r"built with TensorRT 10\.9\.0.*TensorRT 11\.0\.0 "
                                            r"cannot load.*pianolm build-engines m"):
        read_build_record(tmp_path, "11.0.0", "m")
    (tmp_path / BUILD_RECORD).write_text("{")
    with pytest.raises(ManifestError, match="unreadable"):
        read_build_record(tmp_path, "10.9.0", "m")


# ---------------------------------------------------------------------------------------------
# Shapes and buffers under the build profile


def _resolve(shape, dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(dims[d] if isinstance(d, str) else d for d in shape)


def test_step_shapes_follow_the_manifest_and_the_profile(manifest):
    stage = manifest.stage("offset")
    dec = stage.decoder
    ranges = _profile_ranges(manifest, stage.step)  # batch 1..32, chunk 1..4, past 0..2044
    capacity = cache_capacity(ranges, dec)
    assert capacity == dec.max_seq_len  # the cache can grow as far as RoPE positions go
    for batch, chunk, past in ((1, 2, 0), (32, 4, 2044), (3, 3, 17), (32, 1, 2044)):
        shapes = step_shapes(dec, batch, chunk, past, T)
        dims = {"batch": batch, "chunk": chunk, "past": past, "past_plus_chunk": past + chunk,
                "frames": T}
        assert shapes == {t.name: _resolve(t.shape, dims) for t in stage.step.inputs}
        check_shapes("offset.step", shapes, ranges)
        # the present this step writes fits the preallocated cache buffer
        present = _resolve(stage.step.output("present.1.value").shape, dims)
        assert present == kv_shape(dec, batch, past + chunk)
        assert nbytes(present, "float16") <= nbytes(kv_shape(dec, batch, capacity), "float16")
    for batch, chunk, past, words in ((33, 1, 0, "tokens [33, 1] not within [1, 1]..[32, 4]"),
                                      (1, 5, 0, "tokens [1, 5]"),
                                      (1, 1, 2045, "past_key_values.0.key [1, 4, 2045, 16]"),
                                      (1, 4, 2045, "key_mask [1, 2049]")):
        with pytest.raises(ValueError, match="build-engines") as e:
            check_shapes("offset.step", step_shapes(dec, batch, chunk, past, T), ranges)
        assert words in str(e.value) and str(e.value).startswith("offset.step: ")


def test_cache_capacity_of_a_narrow_profile(manifest):
    stage = manifest.stage("onset")
    ranges = _profile_ranges(manifest, stage.step, batch=(1, 2, 4), past=(0, 16, 100),
                             chunk=(1, 1, 3))
    assert cache_capacity(ranges, stage.decoder) == 103
    assert ranges["tokens"].high == (4, 3)
    assert ranges["past_key_values.1.value"].low == (1, 4, 0, 16)
    assert ranges["cross.0.key"].high == (4, 4, 16, T)  # K^T: frames last
    assert nbytes(kv_shape(stage.decoder, 4, 103), "float32") == 4 * 4 * 103 * 16 * 4


def _emulate(copies: list[Copy2D], src: np.ndarray, dst: np.ndarray) -> None:
    """cudaMemcpy2D as documented: `height` rows of `width` bytes; width <= both pitches."""
    for c in copies:
        assert 0 < c.width <= min(c.src_pitch, c.dst_pitch)
        for h in range(c.height):
            s, d = c.src_offset + h * c.src_pitch, c.dst_offset + h * c.dst_pitch
            assert s + c.width <= src.size and d + c.width <= dst.size
            dst[d:d + c.width] = src[s:s + c.width]


@pytest.mark.parametrize("rows, runs", [
    ([0, 1, 2, 3, 4], 1), ([1, 2, 4], 2), ([4, 0, 2], 3), ([3], 1), ([2, 3, 0, 1], 2),
    ([0, 2, 3, 4], 2),
])
def test_select_copies_gather_rows_like_numpy(rows, runs):
    """A [L, B, H, P, Dh] cache in a buffer sized for a longer one (the ping-pong buffers):
    the copies leave exactly cache[:, rows] as the prefix of the destination buffer."""
    rng = np.random.default_rng(len(rows))
    layers, batch, heads, past, dh, capacity = 3, 5, 2, 7, 4, 11
    cache = rng.normal(size=(layers, batch, heads, past, dh)).astype(np.float16)
    src = np.zeros(layers * batch * heads * capacity * dh * 2, dtype=np.uint8)
    src[:cache.nbytes] = cache.reshape(-1).view(np.uint8)
    dst = np.full_like(src, 0xAB)
    copies = select_copies(np.array(rows), batch, layers, heads * past * dh * 2)
    assert len(copies) == runs
    _emulate(copies, src, dst)
    want = cache[:, rows]
    got = dst[:want.nbytes].view(np.float16).reshape(want.shape)
    np.testing.assert_array_equal(got, want)
    assert (dst[want.nbytes:] == 0xAB).all()  # nothing written past the kept tensor


def test_select_copies_of_an_empty_cache():
    assert select_copies([1, 0], 3, 2, 0) == []  # keep() before the prefill: past length 0


def test_engine_io_against_the_manifest(manifest):
    graph = manifest.stage("onset").step
    io = {t.name: (True, t.dtype) for t in graph.inputs}
    io.update({t.name: (False, t.dtype) for t in graph.outputs})
    assert engine_io_problems(graph, io) == []
    bad = dict(io, key_mask=(True, "int32"), extra=(False, "float32"))
    del bad["present.1.value"]
    bad["logits"] = (True, "float32")
    assert engine_io_problems(graph, bad) == [
        "output present.1.value (float32) missing",
        "key_mask is an input of int32, the manifest says input of bool",
        "logits is an input of float32, the manifest says output of float32",
        "unexpected tensor extra"]


# ---------------------------------------------------------------------------------------------
# Construction errors


def _trt_missing() -> str | None:
    """Why the TensorRT backend cannot run here, or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"tensorrt not importable ({type(e).__name__}: {e})"
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except Exception as e:  # noqa: BLE001
            return f"cuda-python not importable ({type(e).__name__}: {e})"
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count < 1:
        return f"no CUDA GPU ({err})"
    return None


MISSING = _trt_missing()


def test_without_tensorrt_says_what_to_install(manifest):
    if MISSING is None:
        pytest.skip("TensorRT is available here")
    with pytest.raises(BackendUnavailable) as e:
        TensorRTBackend(manifest.folder)
    message = str(e.value)
    print(message)
    assert "\n" not in message and "pip install" in message
    assert "tensorrt" in message and "cuda-python" in message


def test_int8_folder_is_refused(tmp_path):
    folder = tmp_path / "int8"
    synthetic_model(folder, precision="int8")
    with pytest.raises(ManifestError, match="int8 exports .* no TensorRT engines"):
        TensorRTBackend(folder)


# ---------------------------------------------------------------------------------------------
# Real engines (TensorRT, cuda-python and a GPU)


@pytest.fixture(scope="module")
def engines(request, tmp_path_factory):
    if MISSING:
        print(f"TensorRT backend tests skipped: {MISSING}")
        pytest.skip(MISSING)
    from pianolm.runtime.manifest import load_manifest
    from pianolm.runtime.trt_build import build_engines, default_profile

    exported = request.getfixturevalue("exported")
    folder = exported.dirs["hier"]
    profile = default_profile(load_manifest(folder))
    profile["batch"] = (1, 2, 4)
    out = tmp_path_factory.mktemp("engines")
    build_engines(folder, profile, out_dir=out)
    return folder, out


def _audio(batch: int, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).normal(size=(batch, 160000))).astype(np.float32)


@pytest.mark.parametrize("batch", [1, 4])
def test_trt_decode_is_token_identical(engines, batch):
    from pianolm.runtime.decode import RowSpec, decode_batch
    from pianolm.runtime.ort_backend import OrtBackend

    folder, engines_dir = engines
    ref, trt = OrtBackend(folder, threads=1), TensorRTBackend(folder, engines_dir)
    audio = _audio(batch, seed=1)
    emb = ref.encode(audio)
    print(f"batch {batch}: max |embeddings - ORT| = {np.abs(trt.encode(audio) - emb).max():.1e}")
    rows = [RowSpec(0), RowSpec(1, 0), RowSpec(2, 1), RowSpec(5)][:batch]
    want = decode_batch(ref, audio, rows, max_notes=20)
    got = decode_batch(trt, audio, rows, max_notes=20)
    assert [s.tokens for s in got] == [s.tokens for s in want]
    assert [s.carry_out for s in got] == [s.carry_out for s in want]


def test_trt_logits_keep_and_profile_limits(engines):
    from pianolm.runtime.ort_backend import OrtBackend

    folder, engines_dir = engines
    ref, trt = OrtBackend(folder, threads=1), TensorRTBackend(folder, engines_dir)
    emb = ref.encode(_audio(4, seed=2))
    want_s, got_s = ref.start("velocity", emb), trt.start("velocity", emb)
    rng = np.random.default_rng(0)
    rows, worst = np.arange(4), 0.0
    for i in range(8):
        n = 2 if i == 0 else int(rng.integers(1, 4))
        tokens = rng.integers(0, vocab.VOCAB_SIZE, size=(4, n)).astype(np.int64)
        mask = np.ones((4, n), bool) if i == 0 else rng.random((4, n)) < 0.7
        if i == 4:
            got_s.keep(np.array([3, 1]))
            rows = rows[[3, 1]]
        want = want_s.step(tokens, mask)
        got = got_s.step(tokens[rows], mask[rows])
        worst = max(worst, float(np.abs(got - want[rows]).max()))
    print(f"max |logits - ORT| over 8 steps with keep: {worst:.1e}")
    assert worst <= 1e-2  # fp32 engines; TensorRT may use TF32 matmuls
    with pytest.raises(ValueError, match="build-engines"):
        trt.start("onset", np.concatenate([emb, emb]))  # batch 8 > the profile's 4
