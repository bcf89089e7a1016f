"""Note offsets and the sustain pedal (runtime/sustain.py): the extension rule, the two
conventions a model's notes come in (manifest encoder.rolls.offsets), and `--sustain` through
`pianolm transcribe`, `eval` and the server, end to end on a rolls-only import with a pedal
(the session's `kong_model`, random Kong weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf

from pianolm.runtime.cli import main
from pianolm.runtime.manifest import ManifestError, load_manifest
from pianolm.runtime.midi import read_notes_json, read_pedals_json, write_midi
from pianolm.runtime.notes import Note, sorted_notes
from pianolm.runtime.sustain import (
    SustainError,
    check_sustain,
    convert_offsets,
    extend_by_pedal,
    offsets_of,
)
from tests.struck_tones import struck_tones

RATE = 16000

# ---------------------------------------------------------------------------------------------
# The extension rule


def test_pedal_holds_note_until_release() -> None:
    assert extend_by_pedal([Note(0.0, 1.0, 60)], [(0.5, 2.0)]) == [Note(0.0, 2.0, 60)]
    assert extend_by_pedal([Note(0.0, 1.0, 60)], [(1.0, 2.0)]) == [Note(0.0, 2.0, 60)]


def test_pedal_hold_cut_by_restrike() -> None:
    notes = [Note(0.0, 1.0, 60), Note(1.5, 1.8, 60), Note(1.2, 1.3, 62)]
    assert extend_by_pedal(notes, [(0.5, 3.0)]) == [
        Note(0.0, 1.5, 60),  # held until the key is struck again
        Note(1.5, 3.0, 60),
        Note(1.2, 3.0, 62),  # other keys do not cut it
    ]


def test_pedal_up_before_release_or_down_after() -> None:
    note = Note(0.0, 1.0, 60)
    assert extend_by_pedal([note], [(0.2, 0.8)]) == [note]
    assert extend_by_pedal([note], [(0.2, 1.0)]) == [note]  # released as the pedal goes up
    assert extend_by_pedal([note], [(1.2, 2.0)]) == [note]
    assert extend_by_pedal([note], []) == [note]
    assert extend_by_pedal([note], [(2.0, 0.5)]) == [note]  # empty interval ignored


def test_pedal_intervals_merge_and_never_shorten() -> None:
    assert extend_by_pedal([Note(0.0, 1.0, 60)], [(1.5, 3.0), (0.5, 2.0)]) == [
        Note(0.0, 3.0, 60)]
    overlapping = [Note(0.0, 2.0, 60), Note(1.0, 1.5, 60)]  # re-struck before its release
    assert extend_by_pedal(overlapping, [(1.2, 4.0)]) == [Note(0.0, 2.0, 60),
                                                          Note(1.0, 4.0, 60)]


# ---------------------------------------------------------------------------------------------
# The conventions


def test_convert_offsets_extends_key_releases_only() -> None:
    notes = [Note(0.0, 1.0, 60), Note(0.5, 0.7, 64)]
    pedals = [(0.6, 2.5)]
    assert convert_offsets(notes, pedals, "key", "sounding") == [Note(0.0, 2.5, 60),
                                                                  Note(0.5, 2.5, 64)]
    assert convert_offsets(notes, pedals, "key", "key") == notes  # as the model gives them
    assert convert_offsets(notes, pedals, "sounding", "sounding") == notes


def test_convert_offsets_keeps_note_order() -> None:
    # two notes of one onset and pitch, in offset order; both held to the pedal's release,
    # velocity orders them (NOTE_ORDER)
    notes = [Note(0.0, 1.0, 60, 90), Note(0.0, 2.0, 60, 10)]
    assert convert_offsets(notes, [(0.5, 3.0)], "key", "sounding") == [Note(0.0, 3.0, 60, 10),
                                                                        Note(0.0, 3.0, 60, 90)]


def test_key_releases_from_sounding_notes_are_refused_in_one_line() -> None:
    with pytest.raises(SustainError) as e:
        convert_offsets([Note(0.0, 1.0, 60)], [(0.5, 2.0)], "sounding", "key")
    message = str(e.value)
    assert "\n" not in message and "already include the pedal" in message
    assert "key releases are not known" in message
    with pytest.raises(SustainError, match="choose one of sounding, key"):
        check_sustain("key", "legato")


# ---------------------------------------------------------------------------------------------
# The manifest


def _with_rolls(src: Path, dst: Path, **rolls: object) -> Path:
    """A copy of model folder `src` whose manifest's encoder.rolls fields are set (None:
    removed)."""
    shutil.copytree(src, dst)
    path = dst / "manifest.json"
    manifest = json.loads(path.read_text())
    for key, value in rolls.items():
        if value is None:
            manifest["encoder"]["rolls"].pop(key, None)
        else:
            manifest["encoder"]["rolls"][key] = value
    path.write_text(json.dumps(manifest, indent=1))
    return dst


def test_manifest_offsets_round_trip_and_default(kong_model, tmp_path) -> None:
    _, model = kong_model
    spec = load_manifest(model).encoder.rolls
    assert spec.offsets == "sounding" and "offsets" not in spec.to_dict()  # the default
    key = load_manifest(_with_rolls(model, tmp_path / "key", offsets="key"))
    assert key.encoder.rolls.offsets == "key"
    assert key.encoder.rolls.to_dict()["offsets"] == "key"
    assert offsets_of(key) == "key"  # a rolls-only model's notes are its rolls'
    older = load_manifest(_with_rolls(model, tmp_path / "older", offsets=None))
    assert older.encoder.rolls.offsets == "sounding"  # folders written before the field


@pytest.mark.parametrize("rolls, words", [
    ({"offsets": "legato"}, "'encoder.rolls.offsets' is 'legato'; known: ['sounding', 'key']"),
    ({"offsets": 1}, "'encoder.rolls.offsets' must be str"),
    ({"offsets": "key", "outputs": ["onset", "offset", "frame", "velocity"]},
     "'encoder.rolls.offsets' is 'key', but the encoder graph has no pedal outputs"),
])
def test_manifest_offsets_refused_in_one_line(kong_model, tmp_path, rolls, words) -> None:
    folder = _with_rolls(kong_model[1], tmp_path / "bad", **rolls)
    with pytest.raises(ManifestError) as e:
        load_manifest(folder)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_lm_notes_are_sounding_whatever_the_rolls_say(kong_model, tmp_path) -> None:
    key = load_manifest(_with_rolls(kong_model[1], tmp_path / "key", offsets="key"))
    assert offsets_of(key, "rolls") == "key" and offsets_of(key, "lm") == "sounding"


# ---------------------------------------------------------------------------------------------
# End to end: `pianolm transcribe --sustain`, eval and the server on a model with a pedal


@pytest.fixture(scope="module")
def key_model(kong_model, tmp_path_factory) -> Path:
    """The Kong import, its manifest saying its notes end at key releases."""
    return _with_rolls(kong_model[1], tmp_path_factory.mktemp("sustain") / "key", offsets="key")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """5 s of struck tones: the random-weight model reads notes and pedal presses in it."""
    path = tmp_path_factory.mktemp("clip") / "tones.wav"
    sf.write(path, struck_tones(5.0, 0, harmonics=(1, 2, 3), every_s=0.45), RATE)
    return path


def _transcribe(clip: Path, model: Path, out: Path, *args: str) -> int:
    return main(["transcribe", str(clip), "--model", str(model), "-o", str(out), "--notes",
                 "json", "--threads", "1", *args])


def test_transcribe_sounding_is_the_rule_applied_to_key_releases(key_model, clip, tmp_path):
    assert _transcribe(clip, key_model, tmp_path / "key.mid", "--sustain", "key") == 0
    assert _transcribe(clip, key_model, tmp_path / "sounding.mid") == 0  # the default
    key = read_notes_json(tmp_path / "key.json")
    pedals = read_pedals_json(tmp_path / "key.json")
    sounding = read_notes_json(tmp_path / "sounding.json")
    assert pedals == read_pedals_json(tmp_path / "sounding.json") and pedals
    extended = extend_by_pedal(key, pedals)
    assert sounding == sorted_notes(extended)
    assert sum(e.offset > k.offset for e, k in zip(extended, key)) > len(key) // 10
    assert all(e.offset >= k.offset for e, k in zip(extended, key))


def test_key_from_a_sounding_model_exits_2_before_anything(kong_model, clip, tmp_path, capsys):
    out = tmp_path / "out.mid"
    assert _transcribe(clip, kong_model[1], out, "--sustain", "key") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pianolm: error: sustain 'key'")
    assert "Traceback" not in err and not out.exists() and not out.with_suffix(".json").exists()


def test_corpus_key_from_a_sounding_model_exits_2_before_out_is_made(kong_model, clip, tmp_path,
                                                                     capsys):
    out = tmp_path / "out"
    assert main(["corpus", str(clip.parent), "-o", str(out), "--model", str(kong_model[1]),
                 "--sustain", "key"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sustain 'key'" in err and not out.exists()


def test_eval_key_from_a_sounding_model_exits_2(kong_model, clip, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(clip, data)
    write_midi([Note(0.5, 1.0, 60)], data / "tones.mid")
    report = tmp_path / "eval.json"
    assert main(["eval", "--data", str(data), "--model", str(kong_model[1]), "--sustain", "key",
                 "--json", str(report)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sustain 'key'" in err and not report.exists()


def test_eval_scores_key_releases_and_says_so(key_model, clip, tmp_path, capsys):
    pytest.importorskip("mir_eval")
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(clip, data)
    # the model's own key-release notes as the reference: every F1 is 1 only if the notes are
    # scored as key releases and the reference is read without the pedal extending it
    assert _transcribe(clip, key_model, tmp_path / "key.mid", "--sustain", "key") == 0
    write_midi(read_notes_json(tmp_path / "key.json"), data / "tones.mid",
               pedals=read_pedals_json(tmp_path / "key.json"))
    report = tmp_path / "eval.json"
    assert main(["eval", "--data", str(data), "--model", str(key_model), "--sustain", "key",
                 "--json", str(report), "--threads", "1"]) == 0
    assert "note offsets: key releases (--sustain key)" in capsys.readouterr().out
    result = json.loads(report.read_text())
    assert result["metrics"]["sustain"] == "key"
    assert result["mean"]["rolls"]["onset_offset_f"] == pytest.approx(1.0)
    (data / "tones.tsv").write_text("onset\toffset\tpitch\tvelocity\n")
    (data / "tones.mid").unlink()  # a .tsv reference alone holds sounding offsets only
    assert main(["eval", "--data", str(data), "--model", str(key_model), "--sustain",
                 "key"]) == 2
    assert "--sustain key needs a MIDI reference" in capsys.readouterr().err


def test_server_takes_sustain_per_request(key_model, kong_model, clip, tmp_path):
    pytest.importorskip("httpx")  # fastapi's TestClient runs on it
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from pianolm.runtime.server import create_app
    from pianolm.runtime.transcriber import Transcriber

    assert _transcribe(clip, key_model, tmp_path / "key.mid", "--sustain", "key") == 0
    want = read_notes_json(tmp_path / "key.json")
    with TestClient(create_app(Transcriber(key_model, threads=1))) as client:
        bad = client.post("/v1/transcribe", params={"format": "json", "sustain": "legato"},
                          content=clip.read_bytes())
        assert bad.status_code == 400 and "choose one of" in bad.json()["error"]
        ok = client.post("/v1/transcribe", params={"format": "json", "sustain": "key"},
                         content=clip.read_bytes())  # the server kept serving
        assert ok.status_code == 200
        got = [Note(n["onset"], n["offset"], n["pitch"], n["velocity"])
               for n in ok.json()["notes"]]
        assert len(got) == len(want) and all(
            abs(g.offset - w.offset) < 1e-6 and abs(g.onset - w.onset) < 1e-6
            and (g.pitch, g.velocity) == (w.pitch, w.velocity) for g, w in zip(got, want))
    with TestClient(create_app(Transcriber(kong_model[1], threads=1))) as client:
        refused = client.post("/v1/transcribe", params={"sustain": "key"},
                              content=clip.read_bytes())
        assert refused.status_code == 400 and "\n" not in refused.json()["error"]
        assert "sustain 'key'" in refused.json()["error"]
