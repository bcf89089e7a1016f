"""Runtime notes == PyTorch reference notes on the dev set's audio, through the exported tiny
system (stand-in encoder, tests/tiny_model.py): hierarchical and flattened, batch 1 and 8, one
file and all files at once. The real encoders run the same check in test_export_encoders.py
(PIANOLM_SLOW_TESTS=1)."""

from __future__ import annotations

import pytest

from tests.parity import assert_runtime_matches_torch, devset_audio

pytest.importorskip("torch")
pytest.importorskip("onnxscript")


@pytest.mark.parametrize("kind", ["hier", "flat"])
def test_devset_notes_match_the_torch_reference(exported, devset, kind):
    system = exported.hier if kind == "hier" else exported.flat
    files = devset_audio(devset)
    assert len(files) >= 6
    compared = assert_runtime_matches_torch(system, exported.dirs[kind], files)
    assert compared > 0
