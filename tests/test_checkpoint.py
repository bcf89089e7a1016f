"""Checkpoints: safetensors weights + JSON config; round trip and clear errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import pianolm
from pianolm.export import system as system_mod
from pianolm.export.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    checkpoint_hash,
    load_system,
    save_system,
)
from pianolm.export.torch_backend import TorchBackend
from pianolm.runtime import vocab
from tests.test_decoder import StubEncoder
from tests.test_torch_backend import _audio, make_system


@pytest.fixture(autouse=True)
def stub_encoder(monkeypatch):
    # load_system rebuilds the encoder by name; "stub" is ours
    monkeypatch.setattr(system_mod, "build_encoder", lambda name: StubEncoder())


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, object]:
    system = make_system(seed=11)
    system.encoder.norm.running_mean.add_(0.5)  # a non-default buffer must survive too
    folder = save_system(system, tmp_path_factory.mktemp("ckpt") / "model",
                         metadata={"steps": 123})
    return folder, system


def _logits(system, hierarchical=True) -> dict[str, np.ndarray]:
    backend = TorchBackend(system)
    emb = backend.encode(_audio(2, seed=9))
    out = {}
    for stage in backend.stages:
        s = backend.start(stage, emb)
        s.step(np.array([[vocab.SOS, vocab.TASK_TOKEN[stage]]] * 2), np.ones((2, 2), bool))
        out[stage] = s.step(np.array([[vocab.time_token(5)], [vocab.PAD]]),
                            np.array([[True], [False]]))
    return out


def test_round_trip_identical_outputs(saved):
    folder, system = saved
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    assert cfg["format_version"] == 1 and cfg["pianolm_version"] == pianolm.__version__
    assert cfg["stages"] == ["onset", "velocity", "offset"] and cfg["metadata"] == {"steps": 123}
    loaded = load_system(folder)
    assert loaded.stages == system.stages
    assert loaded.decoder_configs == system.decoder_configs
    for (k, a), (k2, b) in zip(system.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert not any(p.requires_grad for p in loaded.encoder.parameters())
    ref, got = _logits(system), _logits(loaded)
    for stage in ref:
        np.testing.assert_array_equal(ref[stage], got[stage])


def test_flat_round_trip(tmp_path):
    system = make_system(hierarchical=False, seed=2)
    loaded = load_system(save_system(system, tmp_path / "flat") / CONFIG_FILE)  # file path ok
    assert loaded.stages == ("flat",)
    np.testing.assert_array_equal(_logits(system)["flat"], _logits(loaded)["flat"])


def test_hash_is_sha256_of_weights(saved):
    folder, _ = saved
    digest = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert checkpoint_hash(folder) == digest == checkpoint_hash(folder / WEIGHTS_FILE)


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved[0], tmp_path / "copy"))


def _edit_config(folder: Path, fn) -> None:
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    fn(cfg)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, pattern", [
    (lambda c: c.pop("encoder"), "missing field 'encoder'"),
    (lambda c: c.pop("decoders"), "missing field 'decoders'"),
    (lambda c: c["decoders"].pop("velocity"), "missing field 'decoders.velocity'"),
    (lambda c: c["decoders"]["offset"].pop("d_model"), "'decoders.offset'.*d_model"),
    (lambda c: c["decoders"]["onset"].update(n_kv_heads=2), "'decoders.onset'.*n_kv_heads"),
    (lambda c: c["decoders"]["onset"].update(d_model=64.0), "'decoders.onset'.*'d_model'"),
    (lambda c: c.update(hierarchical="yes"), "field 'hierarchical' must be bool"),
    (lambda c: c.update(format_version=99), "field 'format_version' is 99"),
    (lambda c: c.update(format="onnx"), "field 'format'"),
    (lambda c: c.update(stages=["flat"]), "field 'stages'"),
    (lambda c: c["decoders"]["onset"].update(enc_dim=5), "cannot build.*enc_dim"),
])
def test_bad_config_names_file_and_field(copy, edit, pattern):
    _edit_config(copy, edit)
    with pytest.raises(CheckpointError, match=pattern) as err:
        load_system(copy)
    assert str(copy / CONFIG_FILE) in str(err.value)


def test_wrong_shape_names_tensor(copy):
    weights = copy / WEIGHTS_FILE
    state = load_file(weights)
    state["decoders.velocity.head.weight"] = state["decoders.velocity.head.weight"][:-1]
    save_file(state, weights)
    with pytest.raises(CheckpointError, match="'decoders.velocity.head.weight' has shape") as e:
        load_system(copy)
    assert str(weights) in str(e.value)


def test_missing_and_unexpected_tensors(copy):
    weights = copy / WEIGHTS_FILE
    state = load_file(weights)
    state["extra.weight"] = state.pop("encoder.norm.running_mean")
    save_file(state, weights)
    with pytest.raises(CheckpointError, match="missing.*encoder.norm.running_mean.*extra"):
        load_system(copy)


def test_missing_files(copy, tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_system(tmp_path / "nowhere")
    (copy / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_FILE}: missing.*field 'weights'"):
        load_system(copy)
    (copy / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{CONFIG_FILE}: missing"):
        load_system(copy)


def test_corrupt_files(copy):
    (copy / WEIGHTS_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_system(copy)
    (copy / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        load_system(copy)
