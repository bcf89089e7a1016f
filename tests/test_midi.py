"""runtime/midi.py: MIDI write/read, tempo changes, pedal, TSV/JSON, and the dev set."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import mido
import pytest

from pianolm.runtime.midi import (
    MidiError,
    read_midi,
    read_midi_with_pedal,
    read_notes_json,
    read_notes_tsv,
    write_midi,
    write_notes_json,
    write_notes_tsv,
)
from pianolm.runtime.notes import Note


def key(n: Note):
    return (n.pitch, n.onset)  # pairs notes even when rounding reorders near-equal onsets


def random_notes(seed: int, count: int = 200) -> list[Note]:
    """Random notes, no two on the same pitch overlapping (a clean round trip)."""
    rng = random.Random(seed)
    free_at: dict[int, float] = {}
    notes = []
    for _ in range(count):
        pitch = rng.randint(21, 108)
        onset = max(rng.uniform(0, 60), free_at.get(pitch, 0.0) + 0.01)
        offset = onset + rng.uniform(0.02, 3.0)
        free_at[pitch] = offset
        notes.append(Note(onset, offset, pitch, rng.randint(1, 127)))
    return notes


def assert_same_notes(got: list[Note], want: list[Note], tol: float):
    got, want = sorted(got, key=key), sorted(want, key=key)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g.pitch, g.velocity) == (w.pitch, w.velocity), (g, w)
        assert abs(g.onset - w.onset) <= tol and abs(g.offset - w.offset) <= tol, (g, w)


def messages(path) -> list[mido.Message]:
    return [m for t in mido.MidiFile(path).tracks for m in t]


# ----------------------------------------------------------------------------- writing


@pytest.mark.parametrize("tempo_bpm, tpb", [(120, 480), (90, 960), (137.5, 220)])
def test_round_trip_keeps_pitch_velocity_and_times(tmp_path, tempo_bpm, tpb):
    notes = random_notes(tpb)
    path = tmp_path / "rt.mid"
    write_midi(notes, path, tempo_bpm=tempo_bpm, ticks_per_beat=tpb)
    back = read_midi(path)
    half_tick = 60 / (tempo_bpm * tpb) / 2
    assert_same_notes(back, notes, tol=max(1e-3, half_tick + 1e-9))
    assert back == sorted(back, key=lambda n: (n.onset, n.pitch, n.offset))
    mid = mido.MidiFile(path)
    assert mid.ticks_per_beat == tpb
    tempos = [m.tempo for m in messages(path) if m.type == "set_tempo"]
    assert tempos == [mido.bpm2tempo(tempo_bpm)]


def test_written_file_layout(tmp_path):
    path = tmp_path / "l.mid"
    write_midi([Note(1.0, 2.0, 60, 80), Note(0.5, 1.0, 64, 0), Note(0.5, 0.75, 67, 127)], path)
    msgs = messages(path)
    programs = [m for m in msgs if m.type == "program_change"]
    assert [(m.program, m.channel) for m in programs] == [(0, 0)]
    notes = [m for m in msgs if m.type in ("note_on", "note_off")]
    # ends are note_off messages; every attack is audible (velocity 0 written as 1)
    assert all(m.velocity >= 1 for m in notes if m.type == "note_on")
    assert sum(m.type == "note_on" for m in notes) == sum(m.type == "note_off" for m in notes) == 3
    back = read_midi(path)
    assert [(n.pitch, n.velocity) for n in back] == [(64, 1), (67, 127), (60, 80)]
    assert mido.MidiFile(path).length == pytest.approx(2.0, abs=1e-3)


def test_generated_track_writes_the_bytes_of_a_list_built_one(tmp_path):
    """write_midi hands mido a track it generates while writing (flat memory on long files):
    the file must be byte for byte what mido writes from the same messages in a MidiTrack."""
    rng = random.Random(3)
    notes = [Note(t := rng.uniform(0, 60), t + rng.uniform(0.01, 3), rng.randrange(21, 109),
                  rng.randrange(1, 128)) for _ in range(500)]
    path = tmp_path / "g.mid"
    write_midi(notes, path)
    listed = mido.MidiFile(type=0, ticks_per_beat=mido.MidiFile(path).ticks_per_beat)
    listed.tracks.append(mido.MidiTrack(mido.MidiFile(path).tracks[0]))
    listed.save(tmp_path / "l.mid")
    assert path.read_bytes() == (tmp_path / "l.mid").read_bytes()
    assert len(read_midi(path)) == len(read_midi(tmp_path / "l.mid")) > 400


def test_same_pitch_overlaps_are_cut_at_the_restrike(tmp_path):
    path = tmp_path / "o.mid"
    write_midi([Note(0.0, 1.0, 60, 50), Note(0.5, 1.5, 60, 70),  # overlap: first cut at 0.5
                Note(2.0, 2.5, 62, 40), Note(2.0, 3.0, 62, 90),  # same onset: one note
                Note(4.0, 4.5, 64, 60), Note(4.5, 5.0, 64, 61)], path)  # touching: both kept
    back = read_midi(path)
    assert_same_notes(back, [Note(0.0, 0.5, 60, 50), Note(0.5, 1.5, 60, 70),
                             Note(2.0, 3.0, 62, 90),
                             Note(4.0, 4.5, 64, 60), Note(4.5, 5.0, 64, 61)], tol=1e-3)
    # at the shared tick the note_off comes before the new note_on
    t, order = 0, []
    for m in mido.MidiFile(path).tracks[0]:
        t += m.time
        if m.type in ("note_on", "note_off") and m.note == 64:
            order.append((t, m.type))
    assert order == [(3840, "note_on"), (4320, "note_off"), (4320, "note_on"), (4800, "note_off")]


def test_zero_length_note_survives_as_one_tick(tmp_path):
    path = tmp_path / "z.mid"
    write_midi([Note(1.0, 1.0, 60, 64)], path)
    (n,) = read_midi(path)
    assert n.pitch == 60 and n.onset == pytest.approx(1.0) and 0 < n.offset - n.onset < 0.002


@pytest.mark.parametrize("bad", [
    Note(-1.0, 1.0, 60, 64), Note(1.0, 0.5, 60, 64), Note(0.0, 1.0, 128, 64),
    Note(0.0, 1.0, 60, 128), Note(0.0, float("nan"), 60, 64), Note(0.0, 1.0, 60, -1),
])
def test_invalid_note_raises_and_leaves_old_file(tmp_path, bad):
    path = tmp_path / "keep.mid"
    write_midi([Note(0.0, 1.0, 60, 64)], path)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_midi([Note(0.0, 1.0, 62, 64), bad], path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.mid"]


def test_failed_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "keep.mid"
    write_midi([Note(0.0, 1.0, 60, 64)], path)
    before = path.read_bytes()

    def broken_save(self, filename=None, file=None):
        file.write(b"MThd\x00\x00")  # half a file, then the disk "fails"
        raise OSError("disk full")

    monkeypatch.setattr(mido.MidiFile, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_midi(random_notes(1), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.mid"]


def test_write_into_missing_folder_fails_cleanly(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_midi([Note(0.0, 1.0, 60, 64)], tmp_path / "nope" / "x.mid")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- reading


def _save(tmp_path, tracks, tpb=480, type_=1, name="t.mid") -> Path:
    mid = mido.MidiFile(type=type_, ticks_per_beat=tpb)
    for events in tracks:
        track = mido.MidiTrack()
        now = 0
        for tick, msg in events:  # absolute ticks
            track.append(msg.copy(time=tick - now))
            now = tick
        mid.tracks.append(track)
    path = tmp_path / name
    mid.save(path)
    return path


def on(note, vel=64, ch=0):
    return mido.Message("note_on", note=note, velocity=vel, channel=ch)


def off(note, ch=0):
    return mido.Message("note_off", note=note, channel=ch)


def cc64(value, ch=0):
    return mido.Message("control_change", control=64, value=value, channel=ch)


def tempo(bpm):
    return mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(bpm))


def test_tempo_changes_in_a_conductor_track(tmp_path):
    # 480 tpb. 120 bpm: 960 ticks/s until tick 960 (1.0 s); then 60 bpm: 480 ticks/s until
    # tick 1920 (3.0 s); then 240 bpm: 1920 ticks/s.
    conductor = [(0, tempo(120)), (960, tempo(60)), (1920, tempo(240))]
    notes = [(0, on(60, 10)), (480, off(60)),          # 0.0 - 0.5
             (720, on(62, 20)), (1200, off(62)),       # 0.75 - 1.5 (spans the change)
             (1920, on(64, 30)), (3840, off(64))]      # 3.0 - 4.0
    path = _save(tmp_path, [conductor, notes])
    assert_same_notes(read_midi(path), [Note(0.0, 0.5, 60, 10), Note(0.75, 1.5, 62, 20),
                                        Note(3.0, 4.0, 64, 30)], tol=1e-9)


def test_note_on_velocity_zero_restrike_and_open_notes(tmp_path):
    events = [
        (0, on(60, 50)), (480, on(60, 0)),               # vel 0 = off: 0.0-0.5
        (0, on(62, 40)), (240, on(62, 70)), (720, off(62)),  # re-strike: 0-0.25, 0.25-0.75
        (960, on(64, 30)), (1440, on(64, 90)), (1440, off(64)), (1920, off(64)),  # new on first
        (960, off(65)),                                    # stray off: ignored
        (1000, on(66, 5)), (1000, off(66)),                # zero length: dropped
        (2400, on(67, 80)), (2880, mido.MetaMessage("marker", text="end")),  # never released
    ]
    events.sort(key=lambda e: e[0])  # stable: same-tick order as listed
    path = _save(tmp_path, [events], type_=0)
    want = [Note(0.0, 0.5, 60, 50), Note(0.0, 0.25, 62, 40), Note(0.25, 0.75, 62, 70),
            Note(1.0, 1.5, 64, 30), Note(1.5, 2.0, 64, 90), Note(2.5, 3.0, 67, 80)]
    assert_same_notes(read_midi(path), want, tol=1e-9)


def test_channels_pair_separately(tmp_path):
    events = [(0, on(60, 50, ch=0)), (0, on(60, 60, ch=1)), (480, off(60, ch=0)),
              (960, off(60, ch=1))]
    path = _save(tmp_path, [events], type_=0)
    assert_same_notes(read_midi(path), [Note(0.0, 0.5, 60, 50), Note(0.0, 1.0, 60, 60)],
                      tol=1e-9)


def _pedal_file(tmp_path) -> Path:
    # 960 ticks = 1 s. Pedal down 0.3 - 2.0 and 3.0 - 3.5 (with a redundant "down" at 3.2).
    events = [
        (0, on(65, 10)), (192, off(65)),      # 0.0-0.2, before the pedal: unchanged
        (0, on(60, 20)), (480, off(60)),      # released in pedal: held to 2.0
        (96, on(62, 30)), (384, off(62)),     # 0.1-0.4 -> held until re-strike at 1.0
        (960, on(62, 40)), (1152, off(62)),   # 1.0-1.2 -> held to 2.0
        (1440, on(67, 50)), (2400, off(67)),  # released after pedal up: unchanged
        (2400, on(64, 60)), (2880, off(64)),  # 2.5-3.0, pedal goes down at its release: held
        (288, cc64(127)), (1920, cc64(0)),
        (2880, cc64(100)), (3072, cc64(90)), (3360, cc64(10)),
    ]
    events.sort(key=lambda e: e[0])
    return _save(tmp_path, [events], type_=0)


def test_pedal_intervals_and_plain_notes(tmp_path):
    notes, pedal = read_midi_with_pedal(_pedal_file(tmp_path))
    assert pedal == [pytest.approx((0.3, 2.0)), pytest.approx((3.0, 3.5))]
    assert_same_notes(notes, [Note(0.0, 0.2, 65, 10), Note(0.0, 0.5, 60, 20),
                              Note(0.1, 0.4, 62, 30), Note(1.0, 1.2, 62, 40),
                              Note(1.5, 2.5, 67, 50), Note(2.5, 3.0, 64, 60)], tol=1e-9)
    assert_same_notes(read_midi(_pedal_file(tmp_path)), notes, tol=0)


def test_pedal_extension_on_read(tmp_path):
    got = read_midi(_pedal_file(tmp_path), extend_pedal=True)
    assert_same_notes(got, [Note(0.0, 0.2, 65, 10), Note(0.0, 2.0, 60, 20),
                            Note(0.1, 1.0, 62, 30), Note(1.0, 2.0, 62, 40),
                            Note(1.5, 2.5, 67, 50), Note(2.5, 3.5, 64, 60)], tol=1e-9)


def test_pedal_held_at_end_of_file(tmp_path):
    events = [(0, cc64(127)), (0, on(60)), (480, off(60)), (1920, on(61)), (2400, off(61))]
    # the pedal is never lifted: it is released at the file's last event (2.5 s)
    path = _save(tmp_path, [events], type_=0)
    notes, pedal = read_midi_with_pedal(path)
    assert pedal == [pytest.approx((0.0, 2.5))]
    extended = read_midi(path, extend_pedal=True)
    assert [round(n.offset, 6) for n in extended] == [2.5, 2.5]  # 61 ends as the pedal lifts


@pytest.mark.parametrize("content", [b"", b"not a midi file at all", b"MThd\x00\x00\x00\x06"])
def test_unreadable_midi(tmp_path, content):
    path = tmp_path / "bad.mid"
    path.write_bytes(content)
    with pytest.raises(MidiError, match="bad.mid"):
        read_midi(path)
    with pytest.raises(MidiError, match="not found"):
        read_midi(tmp_path / "missing.mid")


# ----------------------------------------------------------------------------- TSV / JSON


def test_tsv_and_json_round_trip(tmp_path):
    notes = random_notes(7, 50) + [Note(0.1234567, 0.5, 60, 0)]
    write_notes_tsv(notes, tmp_path / "n.tsv")
    first = (tmp_path / "n.tsv").read_text().splitlines()[0]
    assert first.split("\t") == ["onset_s", "offset_s", "pitch", "velocity"]
    assert_same_notes(read_notes_tsv(tmp_path / "n.tsv"), notes, tol=1e-6)
    write_notes_json(notes, tmp_path / "n.json", metadata={"model": "test"})
    doc = json.loads((tmp_path / "n.json").read_text())
    assert set(doc["notes"][0]) == {"onset", "offset", "pitch", "velocity"}
    assert doc["metadata"] == {"model": "test"}
    assert_same_notes(read_notes_json(tmp_path / "n.json"), notes, tol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["n.json", "n.tsv"]


@pytest.mark.parametrize("text", [
    "onset\toffset\tnote\tvelocity\n1.0\t2.0\t60\t70\n0.5\t0.75\t62\t30\n",  # MAESTRO-style
    "# comment\n\n1.0 2.0 60 70\n0.5 0.75 62 30\n",                          # no header
    "pitch\tvelocity\tonset_s\toffset_s\n60\t70\t1.0\t2.0\n62.0\t30\t0.5\t0.75\n",  # reordered
])
def test_tsv_variants(tmp_path, text):
    path = tmp_path / "v.tsv"
    path.write_text(text)
    assert read_notes_tsv(path) == [Note(0.5, 0.75, 62, 30), Note(1.0, 2.0, 60, 70)]


def test_tsv_without_velocity_and_errors(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_text("onset\toffset\tpitch\n0.0\t1.0\t60\n")
    assert read_notes_tsv(path) == [Note(0.0, 1.0, 60, 64)]
    path.write_text("onset_s\toffset_s\tpitch\tvelocity\n0.0\t1.0\t60\t64\n0.5\toops\t61\t1\n")
    with pytest.raises(MidiError, match=r"a.tsv:3"):
        read_notes_tsv(path)
    path.write_text("start\tstop\tkey\n0\t1\t60\n")
    with pytest.raises(MidiError, match="offset"):
        read_notes_tsv(path)


# ----------------------------------------------------------------------------- dev set

def test_devset_mid_and_tsv_agree(devset, devset_clip):
    """The .mid has no CC64 and its plain reading equals the .tsv (both already extended)."""
    clip = devset_clip
    mid_notes, pedal = read_midi_with_pedal(devset / clip["midi"])
    tsv_notes = read_notes_tsv(devset / clip["tsv"])
    assert pedal == []  # no pedal events: offsets are baked in
    assert len(mid_notes) == len(tsv_notes) == clip["n_notes"]
    assert_same_notes(mid_notes, tsv_notes, tol=1e-9)  # 0.5 ms grid, written from same notes
    assert read_midi(devset / clip["midi"], extend_pedal=True) == mid_notes  # no-op
    assert [min(n.pitch for n in tsv_notes), max(n.pitch for n in tsv_notes)] == \
        clip["pitch_range"]
    assert [min(n.velocity for n in tsv_notes), max(n.velocity for n in tsv_notes)] == \
        clip["velocity_range"]
    assert all(0 <= n.onset < n.offset <= clip["clip_len_s"] + 1e-3 for n in tsv_notes)


def test_devset_offsets_are_pedal_extended(devset, devset_clip):
    """Evidence that the truth is pedal-extended although the .mid has no CC64: in clips with
    pedal, groups of notes end at the very same 0.5 ms tick (a pedal release); in pedal-free
    clips that only happens at the clip end (notes truncated to the window)."""
    clip = devset_clip
    notes = read_notes_tsv(devset / clip["tsv"])
    groups = Counter(round(n.offset * 2000) for n in notes)
    end_tick = round(clip["clip_len_s"] * 2000)
    releases = [t for t, k in groups.items() if k >= 3 and abs(t - end_tick) > 2]
    if clip["pedal_intervals_in_window"] == 0:
        assert releases == []
    else:
        assert len(releases) >= min(3, clip["pedal_intervals_in_window"])
