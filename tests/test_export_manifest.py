"""The exported-model manifest (runtime/manifest.py, docs/manifest.md): round trip, and every
validation error names the file and the field. Synthetic folders: the validator checks names,
types, shapes and files, not ONNX content, so no export is needed here."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from pianolm.runtime import vocab
from pianolm.runtime.graphs import (
    ENCODER_IO,
    ENCODER_PEDAL_IO,
    ENCODER_ROLLS_IO,
    cross_kv_io,
    kv_names,
    step_io,
)
from pianolm.runtime.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    DecoderSpec,
    EncoderSpec,
    GraphSpec,
    Manifest,
    ManifestError,
    RollsSpec,
    SourceSpec,
    StageSpec,
    TensorSpec,
    file_sha256,
    load_manifest,
    verify_files,
    write_manifest,
)
from pianolm.runtime.rolls import PEDAL_KEYS, ROLL_KEYS, RollDecodeConfig

L, H, DH, E, T = 2, 4, 16, 24, 51


def _graph(folder: Path, file: str, io: tuple, shapes: dict[str, tuple], dtypes: dict[str, str],
           precision: str = "fp32") -> GraphSpec:
    path = folder / file
    path.write_bytes(b"not really onnx: " + file.encode())
    specs = [tuple(TensorSpec(n, dtypes.get(n, "float32"), shapes[n]) for n in names)
             for names in io]
    return GraphSpec(file, precision, specs[0], specs[1], path.stat().st_size,
                     file_sha256(path))


def synthetic_model(folder: Path, stages: tuple[str, ...] = vocab.STAGES,
                    precision: str = "fp32", rolls: RollsSpec | None = None,
                    segmenting: str = "pianolm") -> Manifest:
    """A valid manifest over dummy graph files, written into `folder` (with roll outputs on the
    encoder when `rolls` is given; no stages: a rolls-only model)."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {"waveform": ("batch", "samples"), "embeddings": ("batch", "frames", E),
              "tokens": ("batch", "chunk"), "positions": ("batch", "chunk"),
              "key_mask": ("batch", "past_plus_chunk"),
              "logits": ("batch", "chunk", vocab.VOCAB_SIZE),
              **{k: ("batch", "frames", 88) for k in ROLL_KEYS},
              **{k: ("batch", "frames", 1) for k in PEDAL_KEYS},
              **{n: ("batch", H, "past", DH) for n in kv_names("past_key_values", L)},
              **{n: ("batch", H, "past_plus_chunk", DH) for n in kv_names("present", L)},
              **{n: ("batch", H, *((DH, "frames") if n.endswith(".key") else ("frames", DH)))
                 for n in kv_names("cross", L)}}
    ints = {"tokens": "int64", "positions": "int64", "key_mask": "bool"}
    decoder = DecoderSpec(n_layers=L, d_model=H * DH, n_heads=H, enc_dim=E,
                          vocab_size=vocab.VOCAB_SIZE, max_seq_len=2048, audio_pe_dim=64,
                          max_frames=1024, rope_base=10000.0, norm_eps=1e-5)
    encoder = EncoderSpec("stub", E, 5.0, T, {"hop": 3200},
                          _graph(folder, "encoder.onnx",
                                 ENCODER_IO if rolls is None else
                                 ENCODER_PEDAL_IO if rolls.pedal else ENCODER_ROLLS_IO,
                                 shapes, {}), rolls)
    stage_specs = tuple(
        StageSpec(s, vocab.TASK_TOKEN[s], decoder,
                  _graph(folder, f"{s}_cross_kv.onnx", cross_kv_io(L), shapes, {}, precision),
                  _graph(folder, f"{s}_step.onnx", step_io(L), shapes, ints, precision))
        for s in stages)
    manifest = Manifest(precision, 18, 16000, 160000, encoder, stage_specs,
                        SourceSpec(random_init=True, seed=0), {"pianolm": "test"},
                        default_decoder="lm" if stages else "rolls", segmenting=segmenting)
    write_manifest(manifest, folder)
    return load_manifest(folder)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    synthetic_model(tmp_path / "model")
    return tmp_path / "model"


def _edit(folder: Path, change) -> None:
    path = folder / MANIFEST_FILE
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def _error(folder: Path) -> str:
    with pytest.raises(ManifestError) as e:
        load_manifest(folder)
    message = str(e.value)
    assert str(folder / MANIFEST_FILE) in message or str(folder) in message, message
    return message


def test_round_trip(folder: Path):
    m = load_manifest(folder)
    assert m.stage_names == vocab.STAGES and m.format_version == FORMAT_VERSION
    assert m.folder == folder and m.stage("velocity").task_token == vocab.TASK_VELOCITY
    assert m.stage("onset").decoder.head_dim == DH
    assert set(m.graphs()) == {"encoder", *(f"{s}.{k}" for s in vocab.STAGES
                                            for k in ("cross_kv", "step"))}
    assert m.stage("onset").step.input("past_key_values.1.value").shape == (
        "batch", H, "past", DH)
    assert m.stage("onset").cross_kv.output("cross.0.key").shape == ("batch", H, DH, "frames")
    assert load_manifest(folder / MANIFEST_FILE) == m  # the file itself is accepted too
    write_manifest(m, folder)  # rewriting gives the same manifest
    assert load_manifest(folder) == m
    verify_files(m)
    with pytest.raises(KeyError, match="flat"):
        m.stage("flat")


def test_input_peak_round_trip_and_format_3_without_it(folder: Path):
    """Format 4 adds the optional audio.input_peak; a format-3 folder (none) still loads."""
    m = load_manifest(folder)
    assert m.input_peak is None and "input_peak" not in json.loads(
        (folder / MANIFEST_FILE).read_text())["audio"]
    write_manifest(replace(m, input_peak=0.7), folder)
    assert load_manifest(folder).input_peak == 0.7
    _edit(folder, lambda r: (r.update(format_version=3), r["audio"].pop("input_peak"),
                             last_position_logits(r)))
    old = load_manifest(folder)
    assert old.format_version == 3 and old.input_peak is None


def last_position_logits(raw: dict) -> None:
    """Make a manifest's step graphs give [batch, vocab] logits, as before format 6."""
    for stage in raw["stages"]:
        logits = next(t for t in stage["step"]["outputs"] if t["name"] == "logits")
        del logits["shape"][1]


def older_copy(src: Path, dst: Path, version: int, change=None) -> Path:
    """A copy of model folder `src` at `dst` whose manifest says `version` (its step graphs'
    logits described as that version's), edited further by `change(raw)`."""
    shutil.copytree(src, dst)
    raw = json.loads((dst / MANIFEST_FILE).read_text())
    raw["format_version"] = version
    if version < 6:
        last_position_logits(raw)
    if change is not None:
        change(raw)
    (dst / MANIFEST_FILE).write_text(json.dumps(raw))
    return dst


def test_every_position_logits_from_format_6(folder: Path):
    """Format 6 step graphs give logits after every chunk position; older ones the last
    position's, and each version is held to its own rank."""
    assert all(s.every_position for s in load_manifest(folder).stages)
    _edit(folder, last_position_logits)
    with pytest.raises(ManifestError, match=r"stages\[0\]\.step\.outputs\.logits\.shape.*"
                                            rf"format version {FORMAT_VERSION} step graphs "
                                            r"give \[batch, chunk"):
        load_manifest(folder)
    _edit(folder, lambda r: r.update(format_version=5))
    assert not any(s.every_position for s in load_manifest(folder).stages)


def test_flat_model_is_valid(tmp_path: Path):
    assert synthetic_model(tmp_path, stages=("flat",)).stage_names == ("flat",)


@pytest.mark.parametrize("change, field, words", [
    (lambda r: r.pop("opset"), "opset", "missing"),
    (lambda r: r.update(opset="18"), "opset", "must be int"),
    (lambda r: r.update(opset=True), "opset", "must be int"),
    (lambda r: r.update(opset=13), "opset", "at least 17"),
    (lambda r: r.update(format_version=FORMAT_VERSION + 1), "format_version", "upgrade"),
    (lambda r: r.update(format_version=2), "format_version", "re-export"),
    (lambda r: r.update(format="other"), "format", "expected"),
    (lambda r: r.update(precision="int4"), "precision", "known"),
    (lambda r: r.update(extra=1), "(top level)", "unknown field"),
    (lambda r: r["audio"].pop("segment_samples"), "audio.segment_samples", "missing"),
    (lambda r: r["audio"].update(input_peak=0), "audio.input_peak", "(0, 1]"),
    (lambda r: r["audio"].update(input_peak=1.5), "audio.input_peak", "(0, 1]"),
    (lambda r: r["audio"].update(input_peak="0.7"), "audio.input_peak", "must be"),
    (lambda r: r["vocab"].update(eos=3), "vocab.eos", "runtime/vocab.py"),
    (lambda r: r["vocab"].pop("pitch_base"), "vocab.pitch_base", "runtime/vocab.py"),
    (lambda r: r["encoder"].update(embed_dim=0), "encoder.embed_dim", "> 0"),
    (lambda r: r["stages"][0].update(name="chords"), "stages[0].name", "known stages"),
    (lambda r: r["stages"][1].update(task_token=3), "stages[1].task_token", "uses 4"),
    (lambda r: r.update(stages=r["stages"][:2]), "stages", "exactly"),
    (lambda r: r.update(stages=r["stages"][::-1]), "stages", "in that order"),
    (lambda r: r["stages"][2]["decoder"].pop("n_heads"), "stages[2].decoder.n_heads",
     "missing"),
    (lambda r: r["stages"][2]["decoder"].update(enc_dim=7), "stages[2].decoder.enc_dim",
     "encoder gives"),
    (lambda r: r["encoder"].update(parts=[1, 2]), "encoder.parts", "summing to embed_dim"),
    (lambda r: r["stages"][1]["decoder"].update(enc_offset=-1), "stages[1].decoder.enc_offset",
     ">= 0"),
    (lambda r: r["stages"][0]["decoder"].update(vocab_size=99), "stages[0].decoder.vocab_size",
     "vocabulary"),
    (lambda r: r["stages"][1]["step"]["inputs"][2].pop("dtype"),
     "stages[1].step.inputs[2].dtype", "missing"),
    (lambda r: r["stages"][1]["step"]["inputs"][2].update(dtype="float64"),
     "stages[1].step.inputs[2].dtype", "known dtypes"),
    (lambda r: r["stages"][1]["step"]["inputs"][0].update(name="input_ids"),
     "stages[1].step.inputs", "requires"),
    (lambda r: r["stages"][0]["step"]["inputs"][3]["shape"].__setitem__(1, 3),
     "stages[0].step.inputs.past_key_values.0.key.shape", "axis 1 must be 4"),
    (lambda r: r["stages"][0]["cross_kv"]["outputs"][2]["shape"].__setitem__(2, "frames"),
     "stages[0].cross_kv.outputs.cross.1.key.shape", "axis 2 must be 16"),
    (lambda r: r["stages"][2]["step"]["outputs"].pop(), "stages[2].step.outputs", "requires"),
    (lambda r: r["stages"][0]["cross_kv"]["outputs"][0]["shape"].__setitem__(3, -1),
     "stages[0].cross_kv.outputs[0].shape[3]", "axis name"),
    (lambda r: r["stages"][0]["step"].update(file="../x.onnx"), "stages[0].step.file",
     "inside the folder"),
    (lambda r: r["stages"][0]["step"].update(sha256="abc"), "stages[0].step.sha256", "hex"),
    (lambda r: r["encoder"].pop("graph"), "encoder.graph", "missing"),
    (lambda r: r["source"].update(random_init=False), "source.sha256", "required"),
    (lambda r: r["versions"].update(torch=2), "versions.torch", "must be str"),
])
def test_errors_name_file_and_field(folder: Path, change, field, words):
    _edit(folder, change)
    message = _error(folder)
    assert f"'{field}'" in message and words in message, message


def test_missing_graph_file(folder: Path):
    """A folder missing a graph still loads (the rolls decoder needs the encoder alone); the
    file is named when a graph is opened (runtime/ort_backend.py)."""
    (folder / "velocity_step.onnx").unlink()
    m = load_manifest(folder)
    assert not m.path(m.stage("velocity").step).exists()


def test_missing_folder_or_manifest(tmp_path: Path):
    with pytest.raises(ManifestError, match="no such model folder"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(ManifestError, match="manifest.json: missing"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ManifestError, match="not readable JSON"):
        load_manifest(tmp_path)


def test_verify_files_catches_a_changed_graph(folder: Path):
    m = load_manifest(folder)
    with (folder / "onset_step.onnx").open("ab") as fh:
        fh.write(b"!")
    with pytest.raises(ManifestError, match="onset_step.onnx: .* bytes"):
        verify_files(m)


# ---------------------------------------------------------------------------------------------
# Format version 2: optional roll outputs on the encoder (`encoder.rolls`)

TUNED = RollsSpec(RollDecodeConfig(onset_threshold=0.4, max_note_seconds=8.0,
                                   velocity_curve=(0.004, 0.5, 12.0)), tuned=True,
                  thresholds_from="checkpoint metadata (runs/x)")


@pytest.fixture
def with_rolls(tmp_path: Path) -> Path:
    synthetic_model(tmp_path / "model", rolls=TUNED)
    return tmp_path / "model"


def test_rolls_round_trip(with_rolls: Path):
    m = load_manifest(with_rolls)
    assert m.encoder.rolls == TUNED and m.format_version == FORMAT_VERSION == 8
    assert [t.name for t in m.encoder.graph.outputs] == ["embeddings", *ROLL_KEYS]
    raw = json.loads((with_rolls / MANIFEST_FILE).read_text())["encoder"]["rolls"]
    assert raw["outputs"] == list(ROLL_KEYS) and raw["thresholds"]["onset_threshold"] == 0.4
    assert raw["thresholds"]["velocity_curve"] == [0.004, 0.5, 12.0]  # format 4
    assert raw["min_pitch"] == 21 and raw["num_pitches"] == 88 and raw["tuned"] is True


def test_rolls_are_optional(folder: Path):
    assert load_manifest(folder).encoder.rolls is None


@pytest.mark.parametrize("change, field, words", [
    (lambda r: r["encoder"]["rolls"].update(outputs=["onset"]), "encoder.rolls.outputs",
     "decodes"),
    (lambda r: r["encoder"]["rolls"].update(min_pitch=0), "encoder.rolls.min_pitch", "21"),
    (lambda r: r["encoder"]["rolls"].pop("tuned"), "encoder.rolls.tuned", "missing"),
    (lambda r: r["encoder"]["rolls"]["thresholds"].update(velocity_curve=[1, "a"]),
     "encoder.rolls.thresholds.velocity_curve", "list of numbers"),
    (lambda r: r["encoder"]["rolls"]["thresholds"].update(velocity_curve=2.0),
     "encoder.rolls.thresholds.velocity_curve", "must be list"),
    (lambda r: r["encoder"]["rolls"]["thresholds"].update(onset_threshold="high"),
     "encoder.rolls.thresholds.onset_threshold", "must be int/float"),
    (lambda r: r["encoder"]["rolls"]["thresholds"].update(peak_radius=2.5),
     "encoder.rolls.thresholds.peak_radius", "must be int"),
    (lambda r: r["encoder"]["rolls"]["thresholds"].update(onset_threshold=None),
     "encoder.rolls.thresholds.onset_threshold", "must be"),
    (lambda r: r["encoder"]["rolls"]["thresholds"].update(colour=1),
     "encoder.rolls.thresholds", "unknown field"),
    (lambda r: r["encoder"]["graph"]["outputs"][1]["shape"].__setitem__(2, 87),
     "encoder.graph.outputs.onset.shape", "axis 2 must be 88"),
    (lambda r: r["encoder"]["graph"].update(outputs=r["encoder"]["graph"]["outputs"][:1]),
     "encoder.graph.outputs", "with encoder.rolls"),
])
def test_roll_errors_name_file_and_field(with_rolls: Path, change, field, words):
    _edit(with_rolls, change)
    message = _error(with_rolls)
    assert f"'{field}'" in message and words in message, message


def test_roll_outputs_without_rolls_field_are_refused(with_rolls: Path):
    _edit(with_rolls, lambda r: r["encoder"].pop("rolls"))
    message = _error(with_rolls)
    assert "'encoder.graph.outputs'" in message and "without encoder.rolls" in message


def test_missing_thresholds_take_the_defaults(with_rolls: Path):
    _edit(with_rolls, lambda r: r["encoder"]["rolls"].update(thresholds={}))
    assert load_manifest(with_rolls).encoder.rolls.thresholds == RollDecodeConfig()


# A rolls-only model with Kong's pedal, post-processor and segmenting (`pianolm import kong`)
KONG = RollsSpec(RollDecodeConfig(method="kong"), tuned=True, thresholds_from="Kong's tool",
                 pedal=True)


@pytest.fixture
def rolls_only(tmp_path: Path) -> Path:
    synthetic_model(tmp_path / "model", stages=(), rolls=KONG, segmenting="kong")
    return tmp_path / "model"


def test_rolls_only_model_with_pedal_round_trip(rolls_only: Path):
    m = load_manifest(rolls_only)
    assert m.rolls_only and m.stages == () and m.default_decoder == "rolls"
    assert m.encoder.rolls == KONG and m.segmenting == "kong"
    assert [t.name for t in m.encoder.graph.outputs] == ["embeddings", *ROLL_KEYS, *PEDAL_KEYS]
    raw = json.loads((rolls_only / MANIFEST_FILE).read_text())
    assert raw["stages"] == [] and raw["audio"]["segmenting"] == "kong"
    assert raw["encoder"]["rolls"]["outputs"] == [*ROLL_KEYS, *PEDAL_KEYS]
    assert raw["encoder"]["rolls"]["thresholds"]["method"] == "kong"


def test_models_with_stages_keep_the_default_segmenting(folder: Path):
    raw = json.loads((folder / MANIFEST_FILE).read_text())
    assert "segmenting" not in raw["audio"] and load_manifest(folder).segmenting == "pianolm"


@pytest.mark.parametrize("change, field, words", [
    (lambda r: r.update(default_decoder="lm"), "default_decoder", "without stages"),
    (lambda r: r["audio"].update(segmenting="hops"), "audio.segmenting", "known"),
    (lambda r: r["encoder"]["rolls"]["thresholds"].update(method="magic"),
     "encoder.rolls.thresholds.method", "known"),
    (lambda r: r["encoder"]["rolls"]["thresholds"].update(method=1),
     "encoder.rolls.thresholds.method", "must be str"),
    (lambda r: r["encoder"]["graph"]["outputs"][5]["shape"].__setitem__(2, 88),
     "encoder.graph.outputs.pedal_onset.shape", "axis 2 must be 1"),
    (lambda r: r["encoder"]["rolls"].update(outputs=list(ROLL_KEYS)),
     "encoder.graph.outputs", "with encoder.rolls)"),
])
def test_rolls_only_errors_name_file_and_field(rolls_only: Path, change, field, words):
    _edit(rolls_only, change)
    message = _error(rolls_only)
    assert f"'{field}'" in message and words in message, message
