"""runtime/trt_build.py without TensorRT (and without onnx, as on a torch-free GPU server):
optimization profiles, the trtexec / polygraphy scripts, and `build_engines` driven through a
fake `tensorrt` module (the real build is tested in test_export_onnx.py where TensorRT
imports)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from pianolm.runtime.trt_build import (
    TensorRTUnavailable,
    build_engines,
    check_profile,
    default_profile,
    input_shapes,
    main_build_engines,
    write_trtexec_commands,
)
from tests.test_export_manifest import DH, H, synthetic_model


def test_profile_checks():
    ok = {"batch": (1, 8, 32), "chunk": (1, 1, 4), "past": (0, 256, 2044)}
    assert check_profile(ok) == []
    assert check_profile({**ok, "past_plus_chunk": (1, 257, 2048)}) == []
    assert "past_plus_chunk" in check_profile({**ok, "past_plus_chunk": (1, 256, 2048)})[0]
    assert "min <= opt <= max" in check_profile({**ok, "past": (0, 300, 200)})[0]
    assert "1 <= min" in check_profile({**ok, "batch": (0, 1, 2)})[0]
    assert "(min, opt, max)" in check_profile({**ok, "chunk": (1, 2)})[0]
    from pianolm.runtime.manifest import TensorSpec
    spec = TensorSpec("past_key_values.0.key", "float32", ("batch", 4, "past", 16))
    assert check_profile({"batch": (1, 2, 3)}, [spec]) == [
        "input past_key_values.0.key: axis 'past' has no profile range"]
    mask = TensorSpec("key_mask", "bool", ("batch", "past_plus_chunk"))
    assert input_shapes([mask], ok) == {"key_mask": ((1, 1), (8, 257), (32, 2048))}


def test_scripts(tmp_path):
    folder = tmp_path / "model"
    manifest = synthetic_model(folder)
    profile = default_profile(manifest)
    assert profile["past"] == (0, 256, 2044) and profile["frames"] == (51, 51, 51)
    trtexec, polygraphy = write_trtexec_commands(folder, profile)
    text = trtexec.read_text()
    print(text)
    assert text.count("trtexec --onnx=") == 7 and text.count("--stronglyTyped") == 7
    assert "--saveEngine=onset_step.engine" in text
    # past 0 + chunk 1 at min; past 2044 + chunk 4 at max; every past K and V share "past"
    assert (f"key_mask:1x1,past_key_values.0.key:1x{H}x0x{DH},past_key_values.0.value:1x{H}x0x"
            f"{DH}") in text
    assert f"key_mask:32x2048,past_key_values.0.key:32x{H}x2044x{DH}" in text
    assert f"cross.1.key:32x{H}x{DH}x51,cross.1.value:32x{H}x51x{DH}" in text
    poly = polygraphy.read_text()
    assert poly.count("polygraphy run") == 7 and "'tokens:[0,1224]'" in poly
    assert "--onnxrt --trt" in poly and "'positions:[0,2047]'" in poly
    trtexec, _ = write_trtexec_commands(folder, profile, fp16=True)
    assert "--fp16" in trtexec.read_text() and "TensorRT 10 only" in trtexec.read_text()


# ---------------------------------------------------------------------------------------------
# build_engines through a fake TensorRT


class _Fake:
    """Records what build_engines asks of the TensorRT Python API."""

    def __init__(self, version: str, inputs: dict[str, list[str]], has_fp16: bool) -> None:
        self.calls: list[tuple] = []
        fake = self
        mod = types.ModuleType("tensorrt")
        mod.__version__ = version
        mod.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
        mod.BuilderFlag = types.SimpleNamespace(**({"FP16": 0} if has_fp16 else {}))

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Network:
            def __init__(self, flags):
                fake.calls.append(("create_network", flags))
                self.names: list[str] = []

            @property
            def num_inputs(self):
                return len(self.names)

            def get_input(self, i):
                return types.SimpleNamespace(name=self.names[i])

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                self.network.names = inputs[Path(path).name]
                return True

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                fake.calls.append(("set_shape", name, lo, opt, hi))

        class Config:
            def set_flag(self, flag):
                fake.calls.append(("set_flag", flag))

            def add_optimization_profile(self, profile):
                fake.calls.append(("profile",))

        class Builder:
            def __init__(self, logger):
                pass

            create_network = staticmethod(Network)
            create_builder_config = staticmethod(Config)
            create_optimization_profile = staticmethod(Profile)

            def build_serialized_network(self, network, config):
                return b"engine:" + ",".join(network.names).encode()

        mod.Logger, mod.OnnxParser, mod.Builder = Logger, Parser, Builder
        self.module = mod


def test_scripts_and_profile_of_a_rolls_only_model(tmp_path):
    """`pianolm import kong` folders hold the encoder alone: no chunk or past axis, one engine."""
    from tests.test_export_manifest import KONG

    folder = tmp_path / "model"
    manifest = synthetic_model(folder, stages=(), rolls=KONG, segmenting="kong")
    profile = default_profile(manifest)
    assert sorted(profile) == ["batch", "frames", "samples"]
    trtexec, polygraphy = write_trtexec_commands(folder, profile)
    assert trtexec.read_text().count("trtexec --onnx=encoder.onnx") == 1
    assert polygraphy.read_text().count("polygraphy run") == 1


def _fake_trt(monkeypatch, folder: Path, version: str = "10.13.0", has_fp16: bool = True,
              **model):
    manifest = synthetic_model(folder, **model)
    inputs = {g.file: [t.name for t in g.inputs] for g in manifest.graphs().values()}
    fake = _Fake(version, inputs, has_fp16)
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    return fake


def test_build_engines_with_a_fake_tensorrt(tmp_path, monkeypatch):
    fake = _fake_trt(monkeypatch, tmp_path / "model")
    engines = build_engines(tmp_path / "model")
    assert sorted(engines) == sorted(["encoder"] + [f"{s}.{k}" for s in ("onset", "velocity",
                                                                         "offset")
                                                    for k in ("cross_kv", "step")])
    assert engines["onset.step"].read_bytes().startswith(b"engine:tokens,positions,key_mask")
    assert ("create_network", 1 << 1) in fake.calls  # strongly typed
    assert not any(c[0] == "set_flag" for c in fake.calls)  # no BuilderFlag.FP16
    assert ("set_shape", "past_key_values.1.value", (1, H, 0, DH), (8, H, 256, DH),
            (32, H, 2044, DH)) in fake.calls
    assert ("set_shape", "key_mask", (1, 1), (8, 257), (32, 2048)) in fake.calls
    meta = (tmp_path / "model" / "tensorrt.json").read_text()
    assert '"strongly_typed": true' in meta and '"onset.step": "onset_step.engine"' in meta


def test_build_engines_of_a_rolls_only_model(tmp_path, monkeypatch):
    from tests.test_export_manifest import KONG

    _fake_trt(monkeypatch, tmp_path / "model", stages=(), rolls=KONG, segmenting="kong")
    assert sorted(build_engines(tmp_path / "model")) == ["encoder"]


def test_build_engines_fp16_flag_only_on_tensorrt_10(tmp_path, monkeypatch):
    fake = _fake_trt(monkeypatch, tmp_path / "a")
    build_engines(tmp_path / "a", fp16=True)
    assert ("set_flag", 0) in fake.calls and ("create_network", 0) in fake.calls
    _fake_trt(monkeypatch, tmp_path / "b", version="11.4.0", has_fp16=False)
    with pytest.raises(ValueError, match="no BuilderFlag.FP16.*--precision fp16"):
        build_engines(tmp_path / "b", fp16=True)


def test_build_engines_refuses_int8(tmp_path, monkeypatch):
    _fake_trt(monkeypatch, tmp_path / "x")
    synthetic_model(tmp_path / "int8", precision="int8")
    with pytest.raises(ValueError, match="MatMulNBits"):
        build_engines(tmp_path / "int8")
    assert main_build_engines([str(tmp_path / "int8")]) == 2


def test_missing_tensorrt_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError
    synthetic_model(tmp_path / "m")
    with pytest.raises(TensorRTUnavailable, match="pip install --extra-index-url"):
        build_engines(tmp_path / "m")
    # the command still writes the scripts, then says what to install
    assert main_build_engines([str(tmp_path / "m"), "--batch", "1/4/16"]) == 2
    err = capsys.readouterr().err
    assert "tensorrt-cu12" in err and "trtexec.sh" in err
    assert "--optShapes=waveform:4x160000" in (tmp_path / "m" / "trtexec.sh").read_text()
