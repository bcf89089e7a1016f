"""Fuzzing manifest parsing: any JSON value in any field of the shipped manifest
gives a ManifestError (one line) or a manifest, never another exception."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pianolm.engines import DEFAULT_MODEL_DIR  # noqa: E402
from pianolm.runtime.manifest import ManifestError, load_manifest  # noqa: E402

FIXTURE = HealthCheck.function_scoped_fixture
RAW = json.loads((DEFAULT_MODEL_DIR / "manifest.json").read_text())
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


def _paths(value, prefix=()):
    """Every (path) to a field of the manifest, nested objects and lists included."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:2]):
            yield from _paths(v, (*prefix, i))


PATHS = [p for p in _paths(RAW) if p]


def _set(raw, path, value):
    obj = json.loads(json.dumps(raw))
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return obj


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model")
    for f in DEFAULT_MODEL_DIR.glob("*.onnx"):
        (out / f.name).symlink_to(f)
    shutil.copy(DEFAULT_MODEL_DIR / "manifest.json", out / "manifest.json")
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[FIXTURE])
@given(path=st.sampled_from(PATHS), value=JSON)
def test_any_value_in_any_field(folder: Path, path, value) -> None:
    (folder / "manifest.json").write_text(json.dumps(_set(RAW, path, value)))
    try:
        load_manifest(folder)
    except ManifestError as e:
        assert "\n" not in str(e) and str(e)


@settings(max_examples=100, deadline=None, suppress_health_check=[FIXTURE])
@given(value=JSON)
def test_any_json_document(folder: Path, value) -> None:
    (folder / "manifest.json").write_text(json.dumps(value))
    with pytest.raises(ManifestError):
        load_manifest(folder)
