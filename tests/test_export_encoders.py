"""`export_model` with the real encoders (CRNN, HPPNet) and the tiny decoder preset: graph
parity, token-identical decoding through OrtBackend, the TensorRT static check.

Slow on a shared 2-core CPU (each real encoder export takes ~40-60 s, plus ~60 s for the three
stages' graphs), so it runs only with PIANOLM_SLOW_TESTS=1; tests/test_export_onnx.py covers the
same path with a small stand-in encoder in every run, and tests/test_encoders.py exports both
real encoders' graphs. benchmarks/export_presets.py reports sizes and parity for every preset.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    not os.environ.get("PIANOLM_SLOW_TESTS"),
    reason="real-encoder export is slow here (~2 min per encoder): set PIANOLM_SLOW_TESTS=1")

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from pianolm.export.decoder import sharpen  # noqa: E402
from pianolm.export.onnx_export import EX_SAMPLES, export_model  # noqa: E402
from pianolm.export.parity import graph_parity  # noqa: E402
from pianolm.export.system import SystemConfig, TranscriptionSystem  # noqa: E402
from pianolm.export.tensorrt import check_model  # noqa: E402
from pianolm.export.torch_backend import TorchBackend  # noqa: E402
from pianolm.runtime.decode import RowSpec, decode_batch  # noqa: E402
from pianolm.runtime.ort_backend import OrtBackend  # noqa: E402
from tests.parity import assert_runtime_matches_torch, devset_audio  # noqa: E402


@pytest.fixture(scope="module", params=["hppnet", "crnn"])
def exported(request, tmp_path_factory):
    torch.manual_seed(0)
    system = TranscriptionSystem(SystemConfig(encoder=request.param, decoder="tiny")).eval()
    for i, dec in enumerate(system.decoders.values()):
        sharpen(dec, seed=i)
    folder = tmp_path_factory.mktemp(request.param)
    export_model(system, folder, seed=0, example_samples=EX_SAMPLES)
    return request.param, system, folder


@pytest.mark.parametrize("batch", [1, 4])
def test_graph_parity(exported, batch):
    name, system, folder = exported
    for p in graph_parity(system, folder, batch, samples=EX_SAMPLES, seed=batch):
        print(f"{name}: {p}")
        assert p.max_rel <= 1e-4, p


def test_decode_is_token_identical(exported):
    name, system, folder = exported
    audio = (0.1 * np.random.default_rng(0).normal(size=(2, 160000))).astype(np.float32)
    rows = [RowSpec(0), RowSpec(1, 0)]
    ref = decode_batch(TorchBackend(system), audio, rows, max_notes=6)
    got = decode_batch(OrtBackend(folder), audio, rows, max_notes=6)
    assert [s.tokens for s in got] == [s.tokens for s in ref]


def test_devset_notes_match_the_torch_reference(exported, devset):
    """Transcriber on ONNX Runtime vs the PyTorch reference, real encoder, dev-set audio
    (a 16 kHz WAV and the 44.1 kHz stereo FLAC): batch 1 and 8, one and several files."""
    name, system, folder = exported
    files = devset_audio(devset, ["dev_01", "dev_03"])
    assert len(files) == 2
    assert assert_runtime_matches_torch(system, folder, files, max_notes=24) > 0


def test_tensorrt_static_check(exported):
    assert check_model(exported[2]) == []
