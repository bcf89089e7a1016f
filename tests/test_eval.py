"""`pianolm eval`: the encoder graph's roll outputs and their manifest record, metrics sanity,
scoring a tiny data folder (LM notes and roll-decoded notes, per clip and mean, JSON), format-1
folders (no rolls: LM only, with the reason), and one-line errors."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import soundfile as sf

from pianolm.runtime.cli import main
from pianolm.runtime.manifest import MANIFEST_FILE, file_sha256, load_manifest
from pianolm.runtime.metrics import METRICS, evaluate, note_errors
from pianolm.runtime.midi import write_midi, write_notes_tsv
from pianolm.runtime.notes import Note
from pianolm.runtime.rolls import ROLL_KEYS, RollDecodeConfig

REF = [Note(0.5, 1.0, 60, 70), Note(1.0, 1.8, 64, 50), Note(1.5, 2.5, 67, 90),
       Note(2.2, 2.6, 72, 30)]


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pianolm: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _data(folder, clips=(("a", 3.0), ("b", 12.0)), reference: str = "tsv"):
    """Short noise clips, each with a reference of the same stem."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, (name, seconds) in enumerate(clips):
        rng = np.random.default_rng(k)
        sf.write(folder / f"{name}.wav",
                 (0.1 * rng.normal(size=int(seconds * 16000))).astype(np.float32), 16000)
        if reference == "tsv":
            write_notes_tsv(REF, folder / f"{name}.tsv")
        elif reference == "mid":
            write_midi(REF, folder / f"{name}.mid")
    return folder


# ---------------------------------------------------------------------------------------------
# Metrics (mir_eval): no model needed


def test_metrics_perfect_and_shifted_onsets():
    perfect = evaluate(REF, REF)
    for m in METRICS:
        assert perfect[f"{m}_p"] == perfect[f"{m}_r"] == perfect[f"{m}_f"] == 1.0
    late = [Note(n.onset + 0.06, n.offset + 0.06, n.pitch, n.velocity) for n in REF]
    shifted = evaluate(late, REF)  # 60 ms > the 50 ms onset tolerance
    assert all(shifted[f"{m}_f"] == 0.0 for m in METRICS)
    assert evaluate([Note(n.onset + 0.04, n.offset, n.pitch, n.velocity) for n in REF],
                    REF)["onset_f"] == 1.0


def test_note_errors_name_each_kind_of_error():
    ref = [Note(1.0, 2.0, 60, 80), Note(1.0, 2.0, 64, 80), Note(3.0, 3.5, 50, 80),
           Note(5.0, 6.0, 70, 80), Note(7.0, 9.0, 40, 80), Note(8.0, 8.2, 45, 80)]
    pred = [Note(1.01, 2.0, 60, 80),  # matched
            Note(1.0, 1.2, 64, 80),  # matched, its offset early
            Note(3.1, 3.5, 50, 80),  # 100 ms late: timing (its reference unmatched)
            Note(1.2, 2.0, 60, 80),  # the matched key again 200 ms on: not near, isolated
            Note(1.1, 2.0, 64, 80),  # the matched key again 100 ms on: a repeat
            Note(5.0, 6.0, 82, 80),  # an octave above a reference onset
            Note(5.02, 6.0, 73, 80),  # another key at a reference onset: chord ghost
            Note(7.0, 12.0, 40, 80),  # matched, its offset late
            ]
    errors = note_errors(pred, ref)
    assert errors == {"matched": 3, "missed": 3, "timing": 1, "repeat": 1, "octave": 1,
                      "chord_ghost": 1, "isolated": 1, "offset_early": 1, "offset_late": 1}


def test_training_side_uses_the_runtime_metrics():
    from pianolm.export.train import evaluate as train_evaluate
    from pianolm.runtime import metrics

    assert train_evaluate.evaluate is metrics.evaluate
    assert train_evaluate.score_notes is metrics.score_notes


# ---------------------------------------------------------------------------------------------
# One-line errors, before any model runs


@pytest.mark.parametrize("problem, words", [
    ("missing", "no such data folder"),
    ("empty", "no audio clips"),
    ("no_reference", "no reference beside it"),
    ("two_audio", "share the stem"),
    ("bad_model", "nowhere"),
    ("max_clips", "--max-clips"),
    ("json_folder", "folder does not exist"),
])
def test_errors_are_one_line(tmp_path, capsys, problem, words):
    data = tmp_path / "data"
    args = ["--model", str(tmp_path / "nowhere")]
    if problem == "empty":
        data.mkdir()
        (data / "notes.tsv").write_text("")
    elif problem == "no_reference":
        _data(data, clips=(("a", 1.0),), reference="none")
    elif problem == "two_audio":
        _data(data, clips=(("a", 1.0),))
        shutil.copy(data / "a.wav", data / "a.flac")
    elif problem != "missing":
        _data(data, clips=(("a", 1.0),))
    if problem == "max_clips":
        args += ["--max-clips", "0"]
    if problem == "json_folder":
        args += ["--json", str(tmp_path / "no" / "such" / "r.json")]
    code = main(["eval", "--data", str(data), *args])
    assert code == 2
    assert words in _one_error_line(capsys.readouterr().err)


def test_missing_mir_eval_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mir_eval", None)  # import mir_eval now fails
    code = main(["eval", "--data", str(_data(tmp_path / "d", clips=(("a", 1.0),))),
                 "--model", str(tmp_path / "nowhere")])
    assert code == 2
    assert "pip install 'pianolm[eval]'" in _one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------
# The exported encoder's rolls


def test_encoder_graph_outputs_rolls_and_manifest_records_them(exported):
    from pianolm.runtime.ort_backend import OrtBackend

    m = load_manifest(exported.dirs["hier"])
    outputs = {t.name: (t.dtype, t.shape) for t in m.encoder.graph.outputs}
    assert list(outputs) == ["embeddings", *ROLL_KEYS]
    assert all(outputs[k] == ("float32", ("batch", "frames", 88)) for k in ROLL_KEYS)
    rolls = m.encoder.rolls
    assert rolls is not None and not rolls.tuned and "defaults" in rolls.thresholds_from
    assert rolls.thresholds == RollDecodeConfig()
    for precision in ("fp16", "int8"):  # derived folders keep the encoder and its record
        assert load_manifest(exported.precision(precision)).encoder.rolls == rolls

    backend = OrtBackend(exported.dirs["hier"], threads=1)
    audio = (0.1 * np.random.default_rng(0).normal(size=(2, 160000))).astype(np.float32)
    emb, got = backend.encode_with_rolls(audio)
    np.testing.assert_array_equal(emb, backend.encode(audio))  # one graph, same embeddings
    assert set(got) == set(ROLL_KEYS)
    for r in got.values():
        assert r.shape == (2, m.encoder.frames_per_segment, 88) and r.dtype == np.float32
        assert 0.0 <= r.min() and r.max() <= 1.0


def test_checkpoint_metadata_thresholds_go_into_the_manifest(exported, tmp_path):
    from pianolm.export.checkpoint import save_system
    from pianolm.export.onnx_export import roll_thresholds

    tuned = {"onset_threshold": 0.45, "frame_threshold": 0.2, "score": 0.9}
    ckpt = save_system(exported.hier, tmp_path / "ckpt", metadata={"rolls": tuned})
    spec = roll_thresholds(ckpt)
    assert spec.tuned and "checkpoint's metadata" in spec.thresholds_from
    assert str(tmp_path) not in spec.thresholds_from  # `pianolm eval` prints it: no build path
    assert spec.thresholds == RollDecodeConfig(onset_threshold=0.45, frame_threshold=0.2)
    untuned = save_system(exported.hier, tmp_path / "ckpt2", metadata={"rolls": None})
    assert not roll_thresholds(untuned).tuned


# ---------------------------------------------------------------------------------------------
# Scoring a data folder


def test_eval_scores_lm_and_roll_notes_per_clip_and_mean(exported, tmp_path, capsys):
    data = _data(tmp_path / "data")
    out = tmp_path / "eval.json"
    model = exported.dirs["hier"]
    # batch 2: clip a's only segment shares a batch with clip b's first one
    code = main(["eval", "--data", str(data), "--model", str(model), "--json", str(out),
                 "--batch", "2", "--threads", "1"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "LM notes (F1)" in stdout and "roll notes (F1)" in stdout
    assert "mean (2)" in stdout and "roll-decoding thresholds: untuned" in stdout

    result = json.loads(out.read_text())
    assert result["model"] == str(model) and result["backend"] == "cpu"
    assert result["manifest_sha256"] == file_sha256(model / MANIFEST_FILE)
    assert result["precision"] == "fp32" and result["rolls"]["scored"] is True
    assert result["rolls"]["thresholds"] == RollDecodeConfig().to_dict()
    assert [c["name"] for c in result["clips"]] == ["a", "b"]
    keys = {f"{m}_{x}" for m in METRICS for x in "prf"} | {"n_pred", "n_ref"}
    for clip in result["clips"]:
        for kind in ("lm", "rolls"):
            scores = clip["scores"][kind]
            assert set(scores) == keys and scores["n_ref"] == len(REF)
            assert all(0.0 <= scores[k] <= 1.0 for k in keys - {"n_pred", "n_ref"})
    for kind in ("lm", "rolls"):
        mean = result["mean"][kind]
        assert mean["onset_f"] == pytest.approx(
            np.mean([c["scores"][kind]["onset_f"] for c in result["clips"]]))
    assert result["report"]["files"] == 2 and result["report"]["audio_s"] == pytest.approx(15.0)
    assert result["report"]["backend"] == "cpu" and result["report"]["batch"] == 2


def test_roll_notes_match_a_separate_encoder_run(exported, tmp_path):
    """The rolls kept from the decode loop's encoder run are the clip's own, in order (the
    segments `pianolm transcribe` cuts: the 12 s clip's last one end-aligned, short ones
    tiled)."""
    from pianolm.runtime.audio import load_audio, tail_start, transcription_segments
    from pianolm.runtime.evaluation import evaluate_model
    from pianolm.runtime.metrics import score_notes
    from pianolm.runtime.ort_backend import OrtBackend
    from pianolm.runtime.rolls import decode_rolls, join_segments
    from pianolm.runtime.transcriber import segment_align

    data = _data(tmp_path / "data", clips=(("a", 3.0), ("b", 12.0), ("c", 4.0)),
                 reference="mid")
    result = evaluate_model(data, exported.dirs["hier"], batch=2, threads=1)
    backend = OrtBackend(exported.dirs["hier"], threads=1)
    fps = backend.manifest.encoder.frames_per_second
    for clip in result.clips:
        audio = load_audio(clip.audio)
        align = segment_align(backend)
        _, rolls = backend.encode_with_rolls(np.stack(list(transcription_segments([audio],
                                                                                  align))))
        notes = decode_rolls(join_segments(rolls, fps, n_samples=len(audio),
                                           last_start=tail_start(len(audio), align)), fps)
        assert score_notes(notes, REF) == pytest.approx(clip.scores["rolls"])


def test_folder_without_rolls_scores_lm_notes_only_and_says_why(exported, tmp_path, capsys):
    """A folder whose encoder graph has no roll outputs still evaluates."""
    import onnx

    old = tmp_path / "old"
    shutil.copytree(exported.dirs["hier"], old)
    graph = onnx.load(str(old / "encoder.onnx"))
    keep = [o for o in graph.graph.output if o.name == "embeddings"]
    del graph.graph.output[:]
    graph.graph.output.extend(keep)
    onnx.save(graph, str(old / "encoder.onnx"))
    raw = json.loads((old / MANIFEST_FILE).read_text())
    enc = raw["encoder"]
    del enc["rolls"]
    enc["graph"]["outputs"] = enc["graph"]["outputs"][:1]
    enc["graph"].update(bytes=(old / "encoder.onnx").stat().st_size,
                        sha256=file_sha256(old / "encoder.onnx"))
    (old / MANIFEST_FILE).write_text(json.dumps(raw))

    out = tmp_path / "old.json"
    code = main(["eval", "--data", str(_data(tmp_path / "data", clips=(("a", 2.0),))),
                 "--model", str(old), "--json", str(out), "--threads", "1"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "roll notes not scored" in stdout and "no roll outputs" in stdout
    result = json.loads(out.read_text())
    assert result["rolls"]["scored"] is False and "re-export" in result["rolls"]["reason"]
    assert result["mean"]["rolls"] is None and result["clips"][0]["scores"]["rolls"] is None
    assert result["mean"]["lm"]["n_ref"] == len(REF)
