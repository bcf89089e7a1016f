"""TensorRT without TensorRT: export/tensorrt.py's static compatibility check on hand-made
graphs (green on a clean one, red on If / Loop / unsupported ops / bad types / dynamic rank).
Engine building (runtime/trt_build.py) is tested in test_trt_build.py, without onnx; the
exported graphs themselves are checked in test_export_onnx.py."""

from __future__ import annotations

from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from pianolm.export.tensorrt import check_tensorrt_compat  # noqa: E402
from pianolm.runtime import trt_build as trt_mod  # noqa: E402

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


def test_real_tensorrt_or_skip():
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # noqa: BLE001 (any import failure means: not here)
        pytest.skip(f"TensorRT not importable here ({type(e).__name__}: {e}); "
                    f"{trt_mod.INSTALL_HINT}")
    assert hasattr(tensorrt, "Builder")
