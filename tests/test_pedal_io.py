"""The sustain pedal through pianolm's outputs: CC64 in MIDI, "pedals" in JSON, pedal rows in
TSV (runtime/midi.py), and pedal scoring (runtime/metrics.py score_pedals)."""

from __future__ import annotations

import json
import os

import mido
import pytest

from pianolm.runtime.midi import (
    read_midi,
    read_midi_with_pedal,
    read_notes_json,
    read_notes_tsv,
    read_pedals_json,
    read_pedals_tsv,
    write_midi,
    write_notes_json,
    write_notes_tsv,
)
from pianolm.runtime.notes import Note

TICK = 1 / 960  # 480 ticks/beat at 120 bpm


def assert_same_notes(got, want, tol=TICK):
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want):
        assert (g.pitch, g.velocity) == (w.pitch, w.velocity), (g, w)
        assert abs(g.onset - w.onset) <= tol and abs(g.offset - w.offset) <= tol, (g, w)


def assert_same_pedals(got, want, tol=TICK):
    assert len(got) == len(want), (got, want)
    for (gd, gu), (wd, wu) in zip(got, want):
        assert abs(gd - wd) <= tol and abs(gu - wu) <= tol, (got, want)


def timed(path):
    """(absolute tick, message) of the single track, channel messages only."""
    t, out = 0, []
    for m in mido.MidiFile(path).tracks[0]:
        t += m.time
        if not m.is_meta and m.type != "program_change":
            out.append((t, m))
    return out


# ----------------------------------------------------------------------------- MIDI


NOTES = [Note(0.0, 0.5, 60, 80), Note(0.5, 1.0, 60, 70),   # re-struck at the pedal tick 0.5
         Note(0.25, 0.5, 64, 50), Note(1.0, 1.5, 67, 90)]  # 64 released as the pedal goes down
PEDALS = [(0.0, 0.3),                 # at t = 0
          (0.5, 0.9), (0.8, 1.2),     # overlapping: one interval 0.5 - 1.2
          (1.2, 1.4),                 # touching the previous: merged too
          (1.6, 3.0)]                 # longer than the last note
MERGED = [(0.0, 0.3), (0.5, 1.4), (1.6, 3.0)]


def test_cc64_round_trip(tmp_path):
    path = tmp_path / "p.mid"
    write_midi(NOTES, path, pedals=PEDALS)
    notes, pedals = read_midi_with_pedal(path)
    assert_same_notes(notes, sorted(NOTES, key=lambda n: (n.onset, n.pitch)))
    assert_same_pedals(pedals, MERGED)
    assert read_midi(path) == notes
    ccs = [(t, m.value, m.channel) for t, m in timed(path) if m.type == "control_change"]
    assert all(m.control == 64 for _, m in timed(path) if m.type == "control_change")
    assert ccs == [(0, 127, 0), (288, 0, 0), (480, 127, 0), (1344, 0, 0), (1536, 127, 0),
                   (2880, 0, 0)]
    # the pedal outlasts the notes: the file ends at its release
    assert mido.MidiFile(path).length == pytest.approx(3.0, abs=TICK)


def test_equal_tick_order_pedal_up_down_then_note_off_on(tmp_path):
    path = tmp_path / "o.mid"
    write_midi(NOTES, path, pedals=PEDALS)
    at_half = [(m.type, getattr(m, "value", None), getattr(m, "note", None))
               for t, m in timed(path) if t == 480]
    assert at_half[0] == ("control_change", 127, None)  # pedal down first
    kinds = [k for k, _, _ in at_half]
    assert kinds == ["control_change", "note_off", "note_off", "note_on"]
    # so a key released as the pedal goes down is held, as extend_by_pedal says
    extended = {(n.pitch, round(n.onset, 3)): n.offset for n in read_midi(path, extend_pedal=True)}
    assert extended[(64, 0.25)] == pytest.approx(1.4, abs=TICK)
    assert extended[(60, 0.0)] == pytest.approx(0.5, abs=TICK)  # cut by its re-strike


def test_pedal_up_and_down_quantised_to_one_tick_are_merged(tmp_path):
    path = tmp_path / "q.mid"
    # 1.0 and 1.0003 s fall on the same tick (960): one interval, no up/down at one tick
    write_midi([Note(0.0, 2.0, 60, 64)], path, pedals=[(0.2, 1.0), (1.0003, 1.5)])
    assert_same_pedals(read_midi_with_pedal(path)[1], [(0.2, 1.5)])
    ccs = [m.value for _, m in timed(path) if m.type == "control_change"]
    assert ccs == [127, 0]


def test_zero_length_pedal_is_one_tick(tmp_path):
    path = tmp_path / "z.mid"
    write_midi([], path, pedals=[(1.0, 1.0)])
    notes, ((down, up),) = read_midi_with_pedal(path)
    assert notes == [] and down == pytest.approx(1.0) and 0 < up - down <= 1.5 * TICK


def test_no_pedals_writes_the_same_bytes(tmp_path):
    write_midi(NOTES, tmp_path / "a.mid")
    write_midi(NOTES, tmp_path / "b.mid", pedals=[])
    assert (tmp_path / "a.mid").read_bytes() == (tmp_path / "b.mid").read_bytes()
    assert not any(m.type == "control_change" for _, m in timed(tmp_path / "a.mid"))


@pytest.mark.parametrize("tempo_bpm, tpb", [(90, 960), (137.5, 220)])
def test_cc64_round_trip_other_grids(tmp_path, tempo_bpm, tpb):
    path = tmp_path / "g.mid"
    write_midi(NOTES, path, tempo_bpm=tempo_bpm, ticks_per_beat=tpb, pedals=PEDALS)
    tick = 60 / (tempo_bpm * tpb)
    notes, pedals = read_midi_with_pedal(path)
    assert_same_notes(notes, sorted(NOTES, key=lambda n: (n.onset, n.pitch)), tol=tick)
    assert_same_pedals(pedals, MERGED, tol=tick)


BAD_PEDALS = [
    ((-1.0, 1.0), "before 0"), ((2.0, 1.0), "goes up before"),
    ((0.0, float("nan")), "non-finite"), ((float("inf"), 1.0), "non-finite"),
    ((0.0, 1.0, 2.0), "not a \\(down, up\\) pair"), ("ab", "not a \\(down, up\\) pair"),
    (None, "not a \\(down, up\\) pair"),
]


@pytest.mark.parametrize("bad, words", BAD_PEDALS)
def test_invalid_pedal_refused_one_line_nothing_written(tmp_path, bad, words):
    writers = {
        "keep.mid": lambda p, ped: write_midi(NOTES, p, pedals=ped),
        "keep.tsv": lambda p, ped: write_notes_tsv(NOTES, p, pedals=ped),
        "keep.json": lambda p, ped: write_notes_json(NOTES, p, pedals=ped),
    }
    for name, write in writers.items():
        path = tmp_path / name
        write(path, [(0.0, 0.5)])
        before = path.read_bytes()
        with pytest.raises(ValueError, match=words) as err:
            write(path, [(0.0, 0.5), bad])
        assert "\n" not in str(err.value) and "pedal 1" in str(err.value)
        assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep.json", "keep.mid", "keep.tsv"]
    with pytest.raises(ValueError):
        write_midi(NOTES, tmp_path / "new.mid", pedals=[bad])
    assert not (tmp_path / "new.mid").exists()


# ----------------------------------------------------------------------------- JSON / TSV


def test_json_round_trip(tmp_path):
    path = tmp_path / "n.json"
    write_notes_json(NOTES, path, metadata={"m": 1}, pedals=PEDALS)
    doc = json.loads(path.read_text())
    assert doc["pedals"] == [{"onset": d, "offset": u} for d, u in MERGED]
    assert doc["metadata"] == {"m": 1}
    assert_same_notes(read_notes_json(path), sorted(NOTES), tol=1e-6)
    assert read_pedals_json(path) == MERGED
    write_notes_json(NOTES, path, pedals=[])
    assert json.loads(path.read_text())["pedals"] == [] and read_pedals_json(path) == []
    write_notes_json(NOTES, path)  # pedals=None: no key, as before
    assert "pedals" not in json.loads(path.read_text())
    assert read_pedals_json(path) == []


def test_old_json_still_reads(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"notes": [{"onset": 0.5, "offset": 1.0, "pitch": 60,
                                           "velocity": 70}]}))
    assert read_notes_json(path) == [Note(0.5, 1.0, 60, 70)]
    assert read_pedals_json(path) == []
    path.write_text(json.dumps([{"onset": 0.5, "offset": 1.0, "pitch": 60}]))  # bare list
    assert read_pedals_json(path) == []


def test_tsv_round_trip(tmp_path):
    path = tmp_path / "n.tsv"
    write_notes_tsv(NOTES, path, pedals=PEDALS)
    lines = path.read_text().splitlines(keepends=True)
    assert lines[0].rstrip("\n").split("\t") == ["onset_s", "offset_s", "pitch", "velocity"]
    assert lines[-3:] == ["0.000000\t0.300000\tpedal\t\n", "0.500000\t1.400000\tpedal\t\n",
                          "1.600000\t3.000000\tpedal\t\n"]
    assert read_notes_tsv(path) == sorted(NOTES)
    assert read_pedals_tsv(path) == MERGED
    # the note part is exactly the pedal-free file
    write_notes_tsv(NOTES, tmp_path / "plain.tsv")
    assert "".join(lines[:-3]) == (tmp_path / "plain.tsv").read_text()
    assert read_pedals_tsv(tmp_path / "plain.tsv") == []


def test_tsv_pedal_rows_only_exact(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text("onset_s\toffset_s\tpitch\tvelocity\n0\t1\tPedal\t\n")
    with pytest.raises(ValueError, match="x.tsv:2"):  # nothing looser than `pedal`
        read_notes_tsv(path)
    path.write_text("onset_s\toffset_s\tpitch\tvelocity\n0\toops\tpedal\t\n")
    with pytest.raises(ValueError, match="x.tsv:2: bad pedal line"):
        read_pedals_tsv(path)
    path.write_text("# no header\n1.0 2.0 pedal\n0.5 0.75 62 30\n")
    assert read_notes_tsv(path) == [Note(0.5, 0.75, 62, 30)]
    assert read_pedals_tsv(path) == [(1.0, 2.0)]


def test_old_tsv_still_reads(tmp_path):
    path = tmp_path / "old.tsv"
    path.write_text("onset_s\toffset_s\tpitch\tvelocity\n1.0\t2.0\t60\t70\n0.5\t0.75\t62\t30\n")
    assert read_notes_tsv(path) == [Note(0.5, 0.75, 62, 30), Note(1.0, 2.0, 60, 70)]
    assert read_pedals_tsv(path) == []


# ----------------------------------------------------------------------------- scoring


REF = [(0.5, 2.0), (3.0, 4.0), (5.0, 7.5)]


def shifted(pedals, dt):
    return [(d + dt, u + dt) for d, u in pedals]


def test_score_pedals_known_cases():
    pytest.importorskip("mir_eval")
    from pianolm.runtime.metrics import score_pedals

    keys = {f"pedal_{m}_{x}" for m in ("onset", "onset_offset") for x in "prf"}
    same = score_pedals(REF, REF)
    assert set(same) == keys | {"pedal_n_pred", "pedal_n_ref"}
    assert all(same[k] == 1.0 for k in keys)
    assert (same["pedal_n_pred"], same["pedal_n_ref"]) == (3.0, 3.0)

    near = score_pedals(shifted(REF, 0.03), REF)  # 30 ms: onsets and offsets (>= 50 ms) hit
    assert near["pedal_onset_f"] == 1.0 and near["pedal_onset_offset_f"] == 1.0
    far = score_pedals(shifted(REF, 0.08), REF)  # 80 ms: onsets miss
    assert far["pedal_onset_f"] == 0.0 and far["pedal_onset_offset_f"] == 0.0

    # right downs, one up 0.5 s late on a 1 s interval (tolerance 0.2 s): onset hit only
    late = [(0.5, 2.0), (3.0, 4.5), (5.0, 7.5)]
    s = score_pedals(late, REF)
    assert s["pedal_onset_f"] == 1.0 and s["pedal_onset_offset_f"] == pytest.approx(2 / 3)

    extra = score_pedals(REF + [(9.0, 9.5)], REF)  # one false positive
    assert extra["pedal_onset_p"] == pytest.approx(3 / 4) and extra["pedal_onset_r"] == 1.0

    # Kong et al.'s 200 ms onset tolerance accepts the 80 ms shift
    from pianolm.runtime.metrics import KONG_PEDAL_ONSET_TOLERANCE

    kong = score_pedals(shifted(REF, 0.08), REF, onset_tolerance=KONG_PEDAL_ONSET_TOLERANCE)
    assert kong["pedal_onset_f"] == 1.0


def test_score_pedals_empty_cases():
    pytest.importorskip("mir_eval")
    from pianolm.runtime.metrics import score_notes, score_pedals

    both = score_pedals([], [])
    assert both["pedal_onset_f"] == both["pedal_onset_offset_r"] == 1.0
    assert both["pedal_n_pred"] == both["pedal_n_ref"] == 0.0
    for pred, ref in (([], REF), (REF, [])):
        s = score_pedals(pred, ref)
        assert all(s[k] == 0.0 for k in s if k.endswith(("_p", "_r", "_f")))
    # zero-length intervals are scored, not refused by mir_eval
    assert score_pedals([(1.0, 1.0)], [(1.0, 1.0)])["pedal_onset_offset_f"] == 1.0
    # the keys merge with the note scores without clashing
    row = {**score_notes([], []), **score_pedals([], [])}
    assert len(row) == len(score_notes([], [])) + len(both)
