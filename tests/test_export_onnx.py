"""`export_model` end to end on the tiny preset: every graph in ONNX Runtime vs PyTorch, and
decoding through the exported graphs (runtime OrtBackend) token-identical to the PyTorch
reference decode, for the three stages and the flattened baseline; fp16 / int8 folders; the
TensorRT static check on every exported graph; the runtime's checks of a folder.

Kept light for a shared 2-core machine: each system is exported once per module (the step
graph's export dominates, ~15 s each), the encoder is a small conv + biGRU stand-in with the
encoder interface (the real CRNN / HPPNet exports take ~40-60 s each here; they run in
test_export_encoders.py when PIANOLM_SLOW_TESTS=1).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from pianolm.export.onnx_export import CrossKVGraph, _cross_plan, _export  # noqa: E402
from pianolm.export.parity import graph_parity, random_step_inputs  # noqa: E402
from pianolm.export.precision import _is_head, convert_model  # noqa: E402
from pianolm.export.tensorrt import check_model  # noqa: E402
from pianolm.export.torch_backend import TorchBackend  # noqa: E402
from pianolm.runtime import vocab  # noqa: E402
from pianolm.runtime.decode import RowSpec, decode_batch  # noqa: E402
from pianolm.runtime.manifest import MANIFEST_FILE, ManifestError, load_manifest  # noqa: E402
from pianolm.runtime.ort_backend import OrtBackend  # noqa: E402

REL_TOL = 1e-4  # fp32 graphs: max |ort - torch| / max |torch|


def _audio(batch: int, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).normal(size=(batch, 160000))).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The folder and its graphs


def test_folder_manifest_and_io(exported):
    m = load_manifest(exported.dirs["hier"])
    assert m.stage_names == vocab.STAGES and m.precision == "fp32" and m.opset == 18
    assert m.source.random_init and m.source.seed == 0 and "torch" in m.versions
    files = sorted(p.name for p in exported.dirs["hier"].iterdir())
    assert files == sorted([MANIFEST_FILE, "encoder.onnx"] + [
        f"{s}_{k}.onnx" for s in vocab.STAGES for k in ("cross_kv", "step")])
    step = m.stage("onset").step
    io = [(t.name, t.dtype, t.shape) for t in step.inputs + step.outputs]
    f32, b = "float32", "batch"
    assert io == [
        ("tokens", "int64", (b, "chunk")), ("positions", "int64", (b, "chunk")),
        ("key_mask", "bool", (b, "past_plus_chunk")),
        *[(f"past_key_values.{i}.{kv}", f32, (b, 4, "past", 64)) for i in (0, 1)
          for kv in ("key", "value")],
        *[x for i in (0, 1) for x in ((f"cross.{i}.key", f32, (b, 4, 64, "frames")),
                                      (f"cross.{i}.value", f32, (b, 4, "frames", 64)))],
        ("logits", f32, (b, "chunk", vocab.VOCAB_SIZE)),
        *[(f"present.{i}.{kv}", f32, (b, 4, "past_plus_chunk", 64)) for i in (0, 1)
          for kv in ("key", "value")]]
    enc = m.encoder.graph
    assert enc.inputs[0].shape == ("batch", "samples")
    assert enc.outputs[0].shape == ("batch", "frames", 24)
    cross = m.stage("velocity").cross_kv
    assert [t.name for t in cross.outputs] == [f"cross.{i}.{kv}" for i in (0, 1)
                                               for kv in ("key", "value")]
    assert cross.outputs[0].shape == (b, 4, 64, "frames")  # K^T
    for name, graph in m.graphs().items():
        model = onnx.load(str(m.path(graph)))
        onnx.checker.check_model(model)
        assert {o.domain for o in model.opset_import} >= {""}
        assert not {n.op_type for n in model.graph.node} & {"If", "Loop", "Scan"}, name
    flat = load_manifest(exported.dirs["flat"])
    assert flat.stage_names == ("flat",) and flat.stage("flat").task_token == vocab.TASK_FLAT


@pytest.mark.parametrize("batch, past, chunk", [(1, 7, 3), (4, 7, 3), (4, 0, 2), (1, 5, 1)])
def test_graph_parity_fp32(exported, batch, past, chunk):
    """Fresh random non-zero inputs; past 0 is the prefill (key mask = the chunk alone)."""
    worst = 0.0
    for system, folder in ((exported.hier, exported.dirs["hier"]),
                           (exported.flat, exported.dirs["flat"])):
        for p in graph_parity(system, folder, batch, seed=batch * 10 + past, past=past,
                              chunk=chunk):
            print(p)
            assert p.max_rel <= REL_TOL, p
            # inputs were really random: every output is non-trivial (the error itself may be
            # exactly 0 where ONNX Runtime and PyTorch run the same kernel, as on AVX-512)
            assert p.scale > 0, p
            worst = max(worst, p.max_rel)
    print(f"batch {batch}, past {past}, chunk {chunk}: max rel error {worst:.1e}")


def test_step_graph_shapes_follow_inputs(exported):
    """Past and chunk lengths come from input shapes, never from traced constants."""
    m = load_manifest(exported.dirs["hier"])
    spec = m.stage("offset")
    session = ort.InferenceSession(str(m.path(spec.step)), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    for batch, past, chunk, frames in ((3, 0, 1, 51), (2, 11, 4, 9), (5, 1, 2, 51)):
        feeds = random_step_inputs(spec.decoder, batch, chunk, past, frames, rng)
        logits, *present = session.run(None, feeds)
        assert logits.shape == (batch, chunk, vocab.VOCAB_SIZE)
        assert len(present) == 4
        for name, kv in zip(spec.decoder.past_names, present):
            assert kv.shape == (batch, 4, past + chunk, 64)
            np.testing.assert_array_equal(kv[:, :, :past], feeds[name])  # past ++ chunk


def test_step_graph_reads_caches_without_copying_them(exported):
    """The cost of a step is the weights plus one pass over the caches: a past K/V goes only
    into its Concat with the chunk, a cross K^T / V only into a MatMul (no Split, Gather or
    Transpose that would copy a whole cache every step)."""
    m = load_manifest(exported.dirs["hier"])
    for stage in m.stages:
        model = onnx.load(str(m.path(stage.step)))
        consumers: dict[str, set[str]] = {}
        for node in model.graph.node:
            for name in node.input:
                if node.op_type != "Shape":  # reads the shape only
                    consumers.setdefault(name, set()).add(node.op_type)
        for name in stage.decoder.past_names:
            assert consumers[name] == {"Concat"}, (stage.name, name, consumers[name])
        for name in stage.decoder.cross_names:
            assert consumers[name] == {"MatMul"}, (stage.name, name, consumers[name])


# ---------------------------------------------------------------------------------------------
# Decoding through the exported graphs


@pytest.mark.parametrize("kind, rows", [
    ("hier", [RowSpec(0)]),
    ("hier", [RowSpec(0), RowSpec(1, 0), RowSpec(2, 1), RowSpec(5)]),
    ("flat", [RowSpec(0)]),
    ("flat", [RowSpec(0), RowSpec(1, 0), RowSpec(7), RowSpec(8, 2)]),
])
def test_decode_is_token_identical(exported, kind, rows):
    system = exported.hier if kind == "hier" else exported.flat
    audio = _audio(len(rows), seed=len(rows))
    ref = decode_batch(TorchBackend(system, use_cache=True), audio, rows, max_notes=6)
    got = decode_batch(OrtBackend(exported.dirs[kind], threads=1), audio, rows, max_notes=6)
    assert [s.tokens for s in got] == [s.tokens for s in ref]
    assert [s.carry_out for s in got] == [s.carry_out for s in ref]
    stages = vocab.STAGES if kind == "hier" else ("flat",)
    for stage in stages:  # every stage really decoded something
        assert any(len(s.tokens[stage]) >= 3 for s in got), stage
    if kind == "hier":
        # velocity and offset stages fed 3-token chunks (previous prediction, on, pitch)
        assert any(len(s.tokens["velocity"]) >= 6 for s in got)


def test_backend_checks_inputs(exported):
    backend = OrtBackend(exported.dirs["hier"], threads=1)
    assert backend.stages == vocab.STAGES and backend.segment_samples == 160000
    with pytest.raises(ValueError, match="audio must be"):
        backend.encode(np.zeros((1, 1000), dtype=np.float32))
    emb = backend.encode(_audio(2, seed=0))
    assert emb.shape == (2, 51, 24) and emb.dtype == np.float32
    with pytest.raises(ValueError, match="stage 'flat'"):
        backend.start("flat", emb)
    with pytest.raises(ValueError, match="embeddings must be"):
        backend.start("onset", emb[..., :5])
    session = backend.start("onset", emb)
    with pytest.raises(ValueError, match="tokens must be"):
        session.step(np.zeros((3, 1), dtype=np.int64), np.ones((3, 1), dtype=bool))
    with pytest.raises(ValueError, match="mask shape"):
        session.step(np.zeros((2, 2), dtype=np.int64), np.ones((2, 1), dtype=bool))


def test_backend_refuses_a_graph_that_contradicts_the_manifest(exported, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(exported.dirs["flat"], folder)
    raw = json.loads((folder / MANIFEST_FILE).read_text())
    raw["stages"][0]["step"]["inputs"][3]["dtype"] = "float16"  # the graph says float32
    (folder / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="flat_step.onnx: graph inputs .* do not match"):
        OrtBackend(folder)


# ---------------------------------------------------------------------------------------------
# fp16 and int8


def _logit_error(system, folder: Path, batch: int) -> tuple[float, float]:
    """Max |logits - torch fp32| and that over max |torch|, step graphs of every stage, on the
    same random inputs (past 7, chunk 3)."""
    errors = [p for p in graph_parity(system, folder, batch, seed=5) if p.output == "logits"]
    return max(p.max_abs for p in errors), max(p.max_rel for p in errors)


@pytest.mark.parametrize("precision, rel_bound", [("fp16", 0.02), ("int8", 0.3)])
def test_reduced_precision_loads_runs_and_reports(exported, precision, rel_bound):
    folder = exported.precision(precision)
    m = load_manifest(folder)
    assert m.precision == precision and m.encoder.graph.precision == "fp32"
    for batch in (1, 4):
        err, rel = _logit_error(exported.hier, folder, batch)
        print(f"{precision} batch {batch}: max logit error {err:.2e} abs, {rel:.2e} rel")
        assert np.isfinite(err) and rel < rel_bound
    audio = _audio(4, seed=9)
    rows = [RowSpec(0), RowSpec(1, 0), RowSpec(2, 1), RowSpec(5)]
    got = decode_batch(OrtBackend(folder, threads=1), audio, rows, max_notes=6)
    ref = decode_batch(TorchBackend(exported.hier), audio, rows, max_notes=6)
    same = np.mean([a.tokens[s] == b.tokens[s] for a, b in zip(got, ref) for s in vocab.STAGES])
    print(f"{precision}: {same:.0%} of (row, stage) token sequences identical to fp32 torch")
    sizes = {g.file: g.bytes / 1e6 for g in m.graphs().values()}
    print(f"{precision} graph sizes (MB): {sizes}")


def test_fp16_io_and_fp32_islands(exported):
    m = load_manifest(exported.precision("fp16"))
    step, cross = m.stage("onset").step, m.stage("onset").cross_kv
    dtypes = {t.name: t.dtype for t in step.inputs + step.outputs}
    d = m.stage("onset").decoder
    caches = d.past_names + d.cross_names + d.present_names
    assert dtypes == {"tokens": "int64", "positions": "int64", "key_mask": "bool",
                      "logits": "float32", **{name: "float16" for name in caches}}
    assert cross.input("embeddings").dtype == "float32"  # fed straight from the fp32 encoder
    assert {t.dtype for t in cross.outputs} == {"float16"}
    model = onnx.load(str(m.path(step)))
    inits = {t.name: t.data_type for t in model.graph.initializer}
    fp32, fp16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    head = [i for n in model.graph.node if _is_head(n) for i in n.input if i in inits]
    assert head and all(inits[i] == fp32 for i in head)  # the LM head stays fp32
    assert sum(t == fp16 for t in inits.values()) >= 20  # attention and MLP weights: fp16
    types = {v.name: v.type.tensor_type.elem_type for v in
             onnx.shape_inference.infer_shapes(model).graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in model.graph.input})
    islands = [n for n in model.graph.node if n.op_type in ("Softmax", "Pow", "ReduceMean")]
    assert len(islands) == 4 + 9 * 2  # a softmax per attention; pow + mean per RMSNorm
    for node in islands:  # softmax and RMSNorm compute in fp32
        assert types[node.input[0]] == fp32, node.name
    assert not [n for n in model.graph.node if n.op_type == "Cast"
                and n.input[0] in inits and inits[n.input[0]] == fp32
                and n.attribute[0].i == fp32]  # no Cast of an fp32 weight to fp32


def test_external_data(exported, tmp_path):
    """Graphs over 2 GB keep their weights in `<file>.data`: forced here with a 0-byte limit
    (the torch export path and the fp16 conversion path), then loaded and run."""
    decoder = exported.hier.decoders["onset"]
    _export(_cross_plan(decoder, decoder.cfg.enc_dim), tmp_path / "cross.onnx", 18,
            external_data_bytes=0)
    assert (tmp_path / "cross.onnx.data").stat().st_size > 1e5
    assert (tmp_path / "cross.onnx").stat().st_size < 1e5
    emb = np.random.default_rng(0).normal(size=(2, 51, 24)).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "cross.onnx")).run(["cross.0.key"],
                                                                {"embeddings": emb})
    with torch.inference_mode():
        ref = CrossKVGraph(decoder)(torch.from_numpy(emb))[0].numpy()
    assert np.abs(got[0] - ref).max() <= REL_TOL * np.abs(ref).max()

    folder = tmp_path / "fp16"
    convert_model(exported.dirs["flat"], folder, "fp16", external_data_bytes=0)
    m = load_manifest(folder)
    assert m.stage("flat").step.external_data == "flat_step.onnx.data"
    backend = OrtBackend(folder, threads=1)
    session = backend.start("flat", backend.encode(_audio(1, seed=1)))
    logits = session.step(np.array([[vocab.SOS, vocab.TASK_FLAT]]), np.ones((1, 2), bool))
    assert logits.shape == (1, vocab.VOCAB_SIZE) and np.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------
# TensorRT: the static check on every exported graph; a real build where TensorRT imports


def test_tensorrt_static_check(exported):
    for kind in ("hier", "flat"):
        assert check_model(exported.dirs[kind]) == []
    assert check_model(exported.precision("fp16")) == []
    problems = check_model(exported.precision("int8"))  # ORT's MatMulNBits: ORT only
    assert problems and all("MatMulNBits" in p for p in problems)


def test_build_engines_command(exported, capsys):
    from pianolm.runtime.cli import main

    folder = exported.dirs["flat"]
    assert main(["build-engines", str(folder), "--commands-only", "--batch", "1/2/4"]) == 0
    out = capsys.readouterr().out
    assert "3 graphs ok" in out
    text = (folder / "trtexec.sh").read_text()
    assert "--maxShapes=tokens:4x4,positions:4x4,key_mask:4x2048" in text


def test_build_real_engines_or_skip(exported, tmp_path):
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"TensorRT not importable here ({type(e).__name__}: {e})")
    from pianolm.runtime.trt_build import build_engines

    profile = {"batch": (1, 2, 4), "chunk": (1, 1, 4), "past": (0, 16, 64),
               "frames": (51, 51, 51), "samples": (160000, 160000, 160000)}
    engines = build_engines(exported.dirs["flat"], profile, out_dir=tmp_path)
    assert all(p.stat().st_size > 0 for p in engines.values())


def test_export_command_errors(capsys):
    from pianolm.export.onnx_export import main_export

    with pytest.raises(SystemExit) as e:
        main_export(["--out", "x"])
    assert e.value.code == 2 and "exactly one of --checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main_export(["--random-init", "--out", "x"])
    assert main_export(["--checkpoint", "/nonexistent/ckpt", "--out", "x"]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err
