"""Shared fixtures. `exported`: the tiny hierarchical and flattened systems, exported once per
test session (tests/tiny_model.py) and shared by the export, backend and transcribe tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from tests.tiny_model import export_tiny

    return export_tiny(tmp_path_factory.mktemp("export"))
