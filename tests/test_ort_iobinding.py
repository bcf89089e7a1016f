"""OrtIoBindingBackend (runtime/ort_iobinding.py) against OrtBackend, and `keep` (dropping
finished rows) on both ORT sessions.

On the CPU (device="cpu") the IO-binding path runs the same graphs with the cache held as
OrtValues: logits must equal OrtBackend's, and the hierarchical decode must give the same
tokens. The CUDA tests run where onnxruntime has the CUDAExecutionProvider, and skip (saying
so) elsewhere; without it, device="cuda" must fail with a one-line install hint.
Uses the session-wide `exported` fixture (tests/conftest.py: the tiny systems).
"""

from __future__ import annotations

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

from pianolm.runtime import vocab  # noqa: E402
from pianolm.runtime.backend import BackendUnavailable, RowPositions, check_rows  # noqa: E402
from pianolm.runtime.decode import RowSpec, decode_batch  # noqa: E402
from pianolm.runtime.ort_backend import OrtBackend  # noqa: E402
from pianolm.runtime.ort_iobinding import OrtIoBindingBackend  # noqa: E402
from pianolm.runtime.step_session import StepSession  # noqa: E402

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
NO_CUDA = (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
           f"({ort.get_available_providers()}): CUDA IO-binding tests need onnxruntime-gpu "
           f"and a GPU")


def _audio(batch: int, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).normal(size=(batch, 160000))).astype(np.float32)


def _chunks(batch: int, steps: int, seed: int):
    """A prefill, then chunks of 1-3 random tokens with random padding (some rows wait)."""
    rng = np.random.default_rng(seed)
    yield (np.tile([[vocab.SOS, vocab.TASK_ONSET]], (batch, 1)).astype(np.int64),
           np.ones((batch, 2), dtype=bool))
    for _ in range(steps):
        n = int(rng.integers(1, 4))
        yield (rng.integers(0, vocab.VOCAB_SIZE, size=(batch, n)).astype(np.int64),
               rng.random((batch, n)) < 0.7)


def _max_logit_diff(ref_backend, backend, stage: str, batch: int, seed: int) -> float:
    emb = ref_backend.encode(_audio(batch, seed))
    ref, got = ref_backend.start(stage, emb), backend.start(stage, emb)
    worst = 0.0
    for tokens, mask in _chunks(batch, steps=10, seed=seed):
        a, b = ref.step(tokens, mask), got.step(tokens, mask)
        assert b.dtype == np.float32 and b.shape == (batch, vocab.VOCAB_SIZE)
        worst = max(worst, float(np.abs(a - b).max()))
    return worst


@pytest.fixture(scope="module")
def backends(exported):
    folder = exported.dirs["hier"]
    return OrtBackend(folder, threads=1), OrtIoBindingBackend(folder, device="cpu", threads=1)


@pytest.mark.parametrize("batch", [1, 4])
def test_cpu_logits_equal_ort_backend(backends, batch):
    ref, iob = backends
    assert (iob.stages, iob.sample_rate, iob.segment_samples, iob.precision) == (
        ref.stages, ref.sample_rate, ref.segment_samples, ref.precision)
    for stage in ("onset", "offset"):
        diff = _max_logit_diff(ref, iob, stage, batch, seed=batch)
        print(f"{stage} batch {batch}: max |logits - OrtBackend| = {diff:.1e}")
        assert diff <= 1e-6


@pytest.mark.parametrize("rows", [
    [RowSpec(0)],
    [RowSpec(0), RowSpec(1, 0), RowSpec(2, 1), RowSpec(5)],
])
def test_cpu_decode_is_token_identical(backends, rows, monkeypatch):
    ref, iob = backends
    kept: list[int] = []
    keep = StepSession.keep

    def counted_keep(self, r: np.ndarray) -> None:
        kept.append(len(r))
        keep(self, r)

    monkeypatch.setattr(StepSession, "keep", counted_keep)
    audio = _audio(len(rows), seed=1)
    want = decode_batch(ref, audio, rows, max_notes=20)
    n_ref = len(kept)
    got = decode_batch(iob, audio, rows, max_notes=20)
    assert [s.tokens for s in got] == [s.tokens for s in want]
    assert [s.carry_out for s in got] == [s.carry_out for s in want]
    assert all(len(s.tokens["onset"]) >= 3 for s in got)
    if len(rows) > 1:  # rows finish at different times: both backends dropped them
        assert n_ref > 0 and len(kept) == 2 * n_ref
    print(f"batch {len(rows)}: {n_ref} keep() calls per decode")


@pytest.mark.parametrize("kind", ["ort", "iobinding"])
def test_keep_gives_the_kept_rows_logits(backends, kind):
    """Dropping rows mid-decode (in a new order, twice, and before any step) leaves the other
    rows' logits as they were with the whole batch."""
    ref_backend = backends[0]
    backend = backends[1] if kind == "iobinding" else backends[0]
    emb = ref_backend.encode(_audio(4, seed=7))
    full, cut = ref_backend.start("velocity", emb), backend.start("velocity", emb)
    early = backend.start("velocity", emb)
    early.keep(np.array([2, 0]))  # past length 0
    rows = np.arange(4)
    worst = 0.0
    for i, (tokens, mask) in enumerate(_chunks(4, steps=9, seed=3)):
        if i == 4:
            cut.keep(np.array([3, 0, 2]))
            rows = rows[[3, 0, 2]]
        if i == 7:
            cut.keep(np.array([2, 0]))  # full-batch rows 2 and 3
            rows = rows[[2, 0]]
        want = full.step(tokens, mask)
        got = cut.step(tokens[rows], mask[rows])
        assert got.shape == (len(rows), vocab.VOCAB_SIZE)
        worst = max(worst, float(np.abs(got - want[rows]).max()))
        got = early.step(tokens[[2, 0]], mask[[2, 0]])
        worst = max(worst, float(np.abs(got - want[[2, 0]]).max()))
    assert list(rows) == [2, 3] and cut.batch == 2
    print(f"{kind}: max |kept - full| = {worst:.1e}")
    assert worst <= 1e-5
    with pytest.raises(ValueError, match="tokens must be"):
        cut.step(np.zeros((4, 1), dtype=np.int64), np.ones((4, 1), dtype=bool))


def test_row_positions_select_and_check_rows():
    pos = RowPositions.empty(3)
    pos.advance(np.array([[True, True], [True, False], [False, False]]))
    pos.select(np.array([2, 0]))
    assert pos.counts.tolist() == [0, 2]
    assert pos.key_mask.tolist() == [[False, False], [True, True]]
    positions, key_mask = pos.advance(np.array([[True], [True]]))
    assert positions.tolist() == [[0], [2]] and key_mask.shape == (2, 3)
    assert check_rows(np.array([1, 0], dtype=np.int32), 2).dtype == np.int64
    for bad in ([], [0, 0], [2], [-1], [[0]], [True, False], [0.0]):
        with pytest.raises(ValueError, match="rows to keep"):
            check_rows(np.array(bad), 2)


def test_device_argument(exported):
    with pytest.raises(ValueError, match="device must be one of"):
        OrtIoBindingBackend(exported.dirs["flat"], device="gpu")


# ---------------------------------------------------------------------------------------------
# CUDA


def test_cuda_without_provider_says_what_to_install(exported):
    if HAS_CUDA:
        pytest.skip("onnxruntime has the CUDAExecutionProvider here")
    with pytest.raises(BackendUnavailable) as e:
        OrtIoBindingBackend(exported.dirs["flat"], device="cuda")
    message = str(e.value)
    print(message)
    assert "\n" not in message and "pip install 'pianolm[gpu]'" in message
    assert "CUDAExecutionProvider" in message


@pytest.fixture(scope="module")
def cuda_backend(exported):
    if not HAS_CUDA:
        print(NO_CUDA)
        pytest.skip(NO_CUDA)
    try:
        return OrtIoBindingBackend(exported.dirs["hier"], device="cuda")
    except BackendUnavailable as e:  # provider built in, but CUDA / cuDNN libraries missing
        print(e)
        pytest.skip(str(e))


@pytest.mark.parametrize("batch", [1, 4])
def test_cuda_logits_match_cpu(backends, cuda_backend, batch):
    diff = _max_logit_diff(backends[0], cuda_backend, "onset", batch, seed=batch)
    print(f"cuda batch {batch}: max |logits - CPU| = {diff:.1e}")
    assert diff <= 1e-2  # O(1) logits; CUDA kernels (TF32 matmuls) differ from the CPU's


@pytest.mark.parametrize("rows", [
    [RowSpec(0)],
    [RowSpec(0), RowSpec(1, 0), RowSpec(2, 1), RowSpec(5)],
])
def test_cuda_decode_is_token_identical(backends, cuda_backend, rows):
    audio = _audio(len(rows), seed=1)
    want = decode_batch(backends[0], audio, rows, max_notes=20)
    got = decode_batch(cuda_backend, audio, rows, max_notes=20)
    assert [s.tokens for s in got] == [s.tokens for s in want]
