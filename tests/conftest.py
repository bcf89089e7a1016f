"""Shared fixtures.

`exported`: the tiny hierarchical and flattened systems, exported once per test session
(tests/tiny_model.py) and shared by the export, backend and transcribe tests.
`kong_model`: (checkpoint, folder): random weights in Kong et al.'s Zenodo layout
(export/kong.py random_kong_state) and the rolls-only folder `pianolm import kong` makes of them,
once per test session (the import, serve and corpus tests share it).
`devset`: the public dev set folder ($PIANOLM_DEVSET, default ../shared/devset beside the
checkout, README "Evaluate"); a test that takes it skips, saying where it looked, when it is
absent. `devset_clip`: one clips.json entry, a test per clip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

DEVSET = Path(os.environ.get("PIANOLM_DEVSET",
                             Path(__file__).resolve().parents[2] / "shared" / "devset"))
_MISSING = f"dev set not found at {DEVSET} (set PIANOLM_DEVSET)"


@pytest.fixture(scope="session")
def devset() -> Path:
    if not (DEVSET / "clips.json").is_file():
        pytest.skip(_MISSING)
    return DEVSET


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "devset_clip" in metafunc.fixturenames:
        index = DEVSET / "clips.json"
        clips = json.loads(index.read_text()) if index.is_file() else []
        metafunc.parametrize("devset_clip", clips or [pytest.param(
            None, marks=pytest.mark.skip(reason=_MISSING))], ids=lambda c: c and c["name"])


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from tests.tiny_model import export_tiny

    return export_tiny(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="session")
def kong_model(tmp_path_factory) -> tuple[Path, Path]:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from pianolm.export.importing import main_import
    from pianolm.export.kong import random_kong_state, save_kong_checkpoint

    folder = tmp_path_factory.mktemp("kong")
    checkpoint = folder / "CRNN_note_F1=0.9677_pedal_F1=0.9186.pth"
    save_kong_checkpoint(random_kong_state(seed=0), checkpoint)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main_import(["kong", str(checkpoint), "--out", str(folder / "model")]) == 0
    finally:
        torch.set_num_threads(threads)
    return checkpoint, folder / "model"
