"""Shared fixtures.

`exported`: the tiny hierarchical and flattened systems, exported once per test session
(tests/tiny_model.py) and shared by the export, backend and transcribe tests.
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
