"""TensorRT without TensorRT: export/tensorrt.py's static compatibility check on hand-made
graphs (green on a clean one, red on If / Loop / unsupported ops / bad types / dynamic rank),
and runtime/trt_build.py's optimization profiles, trtexec / polygraphy scripts, and
`build_engines` driven through a fake `tensorrt` module (the real build is tested in
test_export_onnx.py where TensorRT imports). The exported graphs themselves are checked in
test_export_onnx.py."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from pianolm.export.tensorrt import check_tensorrt_compat  # noqa: E402
from pianolm.runtime import trt_build as trt_mod  # noqa: E402
from pianolm.runtime.trt_build import (  # noqa: E402
    TensorRTUnavailable,
    build_engines,
    check_profile,
    default_profile,
    input_shapes,
    main_build_engines,
    write_trtexec_commands,
)
from tests.test_export_manifest import DH, H, synthetic_model  # noqa: E402

F, I64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def _save(tmp_path: Path, nodes, inputs, outputs, initializers=(), name="g.onnx") -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _clean(tmp_path: Path) -> Path:
    """Embedding lookup of int64 tokens, a masked softmax over a matmul: the step graph's
    patterns in miniature."""
    emb = helper.make_tensor("emb", F, [10, 4], [0.1] * 40)
    w = helper.make_tensor("w", F, [4, 4], [0.2] * 16)
    neg = helper.make_tensor("neg", F, [], [-1e9])
    nodes = [helper.make_node("Gather", ["emb", "tokens"], ["x"]),
             helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("Where", ["mask", "y", "neg"], ["z"]),
             helper.make_node("Softmax", ["z"], ["out"], axis=-1)]
    return _save(tmp_path, nodes,
                 [helper.make_tensor_value_info("tokens", I64, ["batch", "chunk"]),
                  helper.make_tensor_value_info("mask", BOOL, ["batch", "chunk", 4])],
                 [helper.make_tensor_value_info("out", F, ["batch", "chunk", 4])],
                 [emb, w, neg])


def test_clean_graph_is_green(tmp_path):
    assert check_tensorrt_compat(_clean(tmp_path)) == []


def _branch(name: str, value: float) -> onnx.GraphProto:
    const = helper.make_node("Constant", [], [f"{name}_out"],
                             value=helper.make_tensor(f"{name}_v", F, [1], [value]))
    return helper.make_graph([const], name, [],
                             [helper.make_tensor_value_info(f"{name}_out", F, [1])])


def test_if_is_red(tmp_path):
    node = helper.make_node("If", ["cond"], ["out"], then_branch=_branch("then", 1.0),
                            else_branch=_branch("else", 0.0))
    path = _save(tmp_path, [node], [helper.make_tensor_value_info("cond", BOOL, [])],
                 [helper.make_tensor_value_info("out", F, [1])])
    problems = check_tensorrt_compat(path)
    assert any("control flow If" in p and "prefill and step" in p for p in problems), problems


def test_loop_is_red(tmp_path):
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["acc_in", "one"], ["acc_out"])], "body",
        [helper.make_tensor_value_info("i", I64, []),
         helper.make_tensor_value_info("cond_in", BOOL, []),
         helper.make_tensor_value_info("acc_in", F, [1])],
        [helper.make_tensor_value_info("cond_out", BOOL, []),
         helper.make_tensor_value_info("acc_out", F, [1])])
    one = helper.make_tensor("one", F, [1], [1.0])
    trip = helper.make_tensor("trip", I64, [], [3])
    cond = helper.make_tensor("cond", BOOL, [], [True])
    loop = helper.make_node("Loop", ["trip", "cond", "x"], ["out"], body=body)
    path = _save(tmp_path, [loop], [helper.make_tensor_value_info("x", F, [1])],
                 [helper.make_tensor_value_info("out", F, [1])], [one, trip, cond])
    assert any("control flow Loop" in p for p in check_tensorrt_compat(path))


def test_unsupported_ops_types_and_ranks_are_red(tmp_path):
    nodes = [
        # ONNX Runtime's dynamic quantization: not parseable by TensorRT
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("MatMulInteger", ["xq", "wq"], ["yq"]),
        # int64 data into a MatMul, and float64 anywhere
        helper.make_node("MatMul", ["lengths", "lengths_t"], ["ll"]),
        helper.make_node("Cast", ["x"], ["xd"], to=TensorProto.DOUBLE),
        # a reshape whose target shape has unknown length: unknown output rank
        helper.make_node("Reshape", ["x", "shape"], ["reshaped"]),
        # Unsqueeze axes must be a constant
        helper.make_node("Unsqueeze", ["x", "axes"], ["unsq"]),
    ]
    wq = helper.make_tensor("wq", TensorProto.UINT8, [4, 4], [1] * 16)
    inputs = [helper.make_tensor_value_info("x", F, [2, 4]),
              helper.make_tensor_value_info("lengths", I64, [2, 2]),
              helper.make_tensor_value_info("lengths_t", I64, [2, 2]),
              helper.make_tensor_value_info("shape", I64, ["n"]),
              helper.make_tensor_value_info("axes", I64, [1])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None)
               for n in ("yq", "ll", "xd", "reshaped", "unsq")]
    problems = check_tensorrt_compat(_save(tmp_path, nodes, inputs, outputs, [wq]))
    text = "\n".join(problems)
    print(text)
    for expected in ("op MatMulInteger is not supported", "op DynamicQuantizeLinear",
                     "MatMul on int64: type not accepted", "float64",
                     "Reshape: output of unknown rank", "Unsqueeze input 1 must be an initializer",
                     "graph input lengths is int64", "graph input shape is int64"):
        assert expected in text, expected
    assert all(p.startswith("g.onnx: ") for p in problems)  # every problem names the file


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


def _fake_trt(monkeypatch, folder: Path, version: str = "10.13.0", has_fp16: bool = True):
    manifest = synthetic_model(folder)
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


def test_real_tensorrt_or_skip():
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # noqa: BLE001 (any import failure means: not here)
        pytest.skip(f"TensorRT not importable here ({type(e).__name__}: {e}); "
                    f"{trt_mod.INSTALL_HINT}")
    assert hasattr(tensorrt, "Builder")
