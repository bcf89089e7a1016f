"""Notes in and out: MIDI files (mido), TSV and JSON note lists.

torch-free; mido and numpy only.

Writing (`write_midi`): a type-0 file with one track: track name, tempo (120 bpm unless told),
4/4, program 0 (acoustic grand piano) on channel 0, then the notes. Conventions:
- Note ends are written as real `note_off` messages (status 0x80) with release velocity 64,
  the MIDI default when release velocity is unknown. Readers that expect `note_on` with
  velocity 0 handle `note_off` as well; `note_off` is never confused with an attack.
- Velocities are kept; velocity 0 (a legal token of the model, but `note_on` velocity 0
  means "note off" in MIDI) is written as velocity 1, the quietest audible attack.
- Times are rounded to the nearest tick (480 ticks/beat at 120 bpm: 1/960 s, error
  <= 0.52 ms); a note is at least one tick long, so no note vanishes.
- Same-pitch overlaps: a note struck again while still sounding is cut at the new onset
  (what a piano does, and what `read_midi` does with a repeated `note_on`); two notes on the
  same pitch and the same tick become one (the longer end, the louder velocity). At equal
  ticks every `note_off` precedes every `note_on`, so a re-strike never reads as a zero-length
  note.
- Sustain pedal (`pedals`, (down, up) intervals in seconds, `pianolm.runtime.notes.Pedal`):
  CC64 value 127 at each down and 0 at each up, on channel 0, in the same track, time-ordered
  with the notes. Intervals are quantised to ticks like notes (at least one tick long), and
  intervals that overlap or touch (in ticks) are merged, so no up and down share a tick. At
  equal ticks the order is: pedal up, pedal down, note_off, note_on. A sequential reader then
  agrees with `extend_by_pedal` (pedal down on [down, up)): a key released at the tick the
  pedal goes down is held, a key released at the tick it goes up is not, and a key struck at
  the tick the pedal goes up is not caught by it. `read_midi_with_pedal` gives back the same
  notes and intervals (within one tick).
- The file is written to a temporary file in the destination folder and moved into place with
  `os.replace`: a failed write never leaves a half-written file (or destroys an old one).

Validation: a note with a non-finite or negative time, an offset before its onset or a
pitch/velocity outside 0..127, and a pedal interval that is not a pair of finite times with
0 <= down <= up, raise a one-line ValueError naming it, before anything is written.

Reading (`read_midi`, `read_midi_with_pedal`): all tracks merged (type 0 and 1; a type-2
file's tracks are merged too), tempo changes honoured, `note_on` velocity 0 = `note_off`, a
repeated `note_on` of a sounding key (same channel) closes the previous note, notes left
sounding at the end of the file end at the file's last event. Sustain pedal: CC64 >= 64 is
down, < 64 up, on any channel (one piano, one pedal); a pedal still down at the end is released
at the file's last event. With `extend_pedal=True`, offsets are extended by the pedal (a key
released while the pedal is down sounds until the pedal is released or the key is struck
again), using runtime/sustain.py `extend_by_pedal`, the single implementation of that rule.

Note lists (TSV, JSON), all written atomically, notes sorted by (onset, pitch), times rounded
to 1 us. Pedal intervals, when given, are validated as for MIDI, sorted, and merged where they
overlap or touch (the form `read_midi_with_pedal` returns):
- JSON: {"notes": [...], "pedals": [{"onset": down, "offset": up}, ...]}; "pedals" is present
  only when pedals are passed (an empty list as []). `read_notes_json` returns the notes,
  `read_pedals_json` the pedals ([] when the key is absent).
- TSV (the dev set's `onset_s offset_s pitch velocity`): the note rows first, exactly as
  without pedals, then one row per pedal interval: `down<TAB>up<TAB>pedal<TAB>` (the pitch
  column holds the literal `pedal`, CC64; the velocity column is empty). `read_notes_tsv`
  recognises exactly those rows (pitch field `pedal`) and skips them; `read_pedals_tsv`
  returns them; a file without such rows has no pedals.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO

import mido
import numpy as np

from .errors import one_line
from .notes import Note, Pedal, sort_notes, sorted_notes
from .sustain import extend_by_pedal

DEFAULT_TEMPO_BPM = 120.0
DEFAULT_TICKS_PER_BEAT = 480
PEDAL_CC = 64  # sustain (damper) pedal
PEDAL_THRESHOLD = 64  # value >= 64: down
NOTE_OFF_VELOCITY = 64  # release velocity written on note_off (MIDI default)
PEDAL_DOWN_VALUE, PEDAL_UP_VALUE = 127, 0  # CC64 values written
TSV_HEADER = ("onset_s", "offset_s", "pitch", "velocity")  # the dev set's columns
TSV_PEDAL = "pedal"  # pitch column of a TSV pedal row (CC64)

__all__ = [
    "MidiError", "write_midi", "read_midi", "read_midi_with_pedal",
    "read_notes_tsv", "read_pedals_tsv", "write_notes_tsv", "write_notes_json", "read_notes_json",
    "read_pedals_json", "atomic_write",
]


class MidiError(ValueError):
    """A MIDI or note-list file that cannot be read; the message names the file."""


# ----------------------------------------------------------------------------- writing


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write through `write(fileobj)` into a temp file beside `path`, then os.replace it.

    The temp file is created with O_EXCL and mode 0o666 filtered by the umask, so the final
    file gets the same permissions a plain open() would give it.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _check_note(i: int, n: Note) -> None:
    if not (math.isfinite(n.onset) and math.isfinite(n.offset)):
        raise ValueError(f"note {i} has a non-finite time: {n}")
    if n.onset < -1e-6:  # tolerate float round-off just below 0
        raise ValueError(f"note {i} starts before 0 s: {n}")
    if n.offset < n.onset:
        raise ValueError(f"note {i} ends before it starts: {n}")
    if not 0 <= int(n.pitch) <= 127 or int(n.pitch) != n.pitch:
        raise ValueError(f"note {i} has pitch {n.pitch!r} outside MIDI 0..127: {n}")
    if not 0 <= int(n.velocity) <= 127 or int(n.velocity) != n.velocity:
        raise ValueError(f"note {i} has velocity {n.velocity!r} outside 0..127: {n}")


def _pedal_list(pedals: Iterable[Pedal]) -> list[Pedal]:
    """Validated (down, up) float pairs, sorted, overlapping or touching intervals merged.

    Raises a one-line ValueError naming the first bad interval (as notes are checked)."""
    out: list[Pedal] = []
    for i, p in enumerate(pedals):
        try:
            down, up = (float(t) for t in p)
        except (TypeError, ValueError):
            raise ValueError(f"pedal {i} is not a (down, up) pair of times: {p!r}") from None
        if not (math.isfinite(down) and math.isfinite(up)):
            raise ValueError(f"pedal {i} has a non-finite time: {(down, up)}")
        if down < -1e-6:  # tolerate float round-off just below 0, as for notes
            raise ValueError(f"pedal {i} goes down before 0 s: {(down, up)}")
        if up < down:
            raise ValueError(f"pedal {i} goes up before it goes down: {(down, up)}")
        out.append((max(0.0, down), max(0.0, up)))
    return _merge_intervals(out)


def _pedal_ticks(pedals: Iterable[Pedal], ticks_per_second: float) -> list[tuple[int, int]]:
    """Validated pedal intervals in ticks: at least one tick long, merged where they overlap
    or touch once quantised (so no pedal up and down share a tick)."""
    ticks = [(d, max(u, d + 1)) for d, u in
             ((round(down * ticks_per_second), round(up * ticks_per_second))
              for down, up in _pedal_list(pedals))]
    return [(int(d), int(u)) for d, u in _merge_intervals(ticks)]


def _note_ticks(notes: Iterable[Note], ticks_per_second: float) -> np.ndarray:
    """Quantise to ticks and resolve same-pitch overlaps: an int64 array of rows (on, off,
    pitch, velocity). In numpy, not a Python list per note: at the end of a long file this
    is where memory peaks."""
    notes = notes if isinstance(notes, Sequence) else list(notes)
    for i, n in enumerate(notes):
        _check_note(i, n)
    if not notes:
        return np.empty((0, 4), np.int64)

    def column(name: str) -> np.ndarray:
        return np.fromiter((getattr(n, name) for n in notes), np.float64, len(notes))

    on = np.maximum(0, np.rint(column("onset") * ticks_per_second).astype(np.int64))
    off = np.maximum(np.rint(column("offset") * ticks_per_second).astype(np.int64), on + 1)
    pitch = column("pitch").astype(np.int64)
    vel = np.maximum(1, column("velocity").astype(np.int64))
    order = np.lexsort((vel, off, on, pitch))  # by pitch, then onset
    on, off, pitch, vel = on[order], off[order], pitch[order], vel[order]
    # same pitch, same tick: one note, as long and as loud as the longest and loudest
    first = np.flatnonzero(np.r_[True, (pitch[1:] != pitch[:-1]) | (on[1:] != on[:-1])])
    on, pitch = on[first], pitch[first]
    off, vel = np.maximum.reduceat(off, first), np.maximum.reduceat(vel, first)
    # struck again while sounding: the earlier note ends where the next begins
    again = np.flatnonzero(pitch[1:] == pitch[:-1])
    off[again] = np.minimum(off[again], on[again + 1])
    return np.column_stack((on, off, pitch, vel))


def write_midi(notes: Iterable[Note], path: str | os.PathLike, tempo_bpm: float = 120.0,
               ticks_per_beat: int = 480, pedals: Iterable[Pedal] = ()) -> None:
    """Write notes (seconds) and sustain-pedal intervals (CC64) as a single-track piano MIDI
    file; see the module doc.

    Raises ValueError for a note with a non-finite or negative time, an offset before its
    onset, or a pitch/velocity outside 0..127, and for a pedal interval that is not a pair of
    finite times with 0 <= down <= up. The write is atomic (temp file + os.replace).
    """
    if not (isinstance(ticks_per_beat, int) and 1 <= ticks_per_beat <= 0x7FFF):
        raise ValueError(f"ticks_per_beat must be an int in 1..32767, got {ticks_per_beat!r}")
    if not (math.isfinite(tempo_bpm) and tempo_bpm > 0):
        raise ValueError(f"tempo_bpm must be positive, got {tempo_bpm!r}")
    tempo = mido.bpm2tempo(tempo_bpm)  # microseconds per beat (an int, as the file stores it)
    if not 1 <= tempo <= 0xFFFFFF:
        raise ValueError(f"tempo_bpm {tempo_bpm!r} is out of the range a MIDI file can store")
    ticks_per_second = ticks_per_beat * 1e6 / tempo

    # events (tick, kind, pitch or controller, velocity or value) in time order, each packed
    # into one int64 whose numeric order is that order (the last two take 7 bits each, kind 2).
    # Kinds in their order at equal ticks (module doc): 0 pedal up, 1 pedal down, 2 note_off,
    # 3 note_on.
    on, off, pitch, vel = _note_ticks(notes, ticks_per_second).T
    pedal = np.array(_pedal_ticks(pedals, ticks_per_second), np.int64).reshape(-1, 2)
    down, up = pedal.T
    events = np.sort(np.concatenate((
        ((on << 2 | 3) << 7 | pitch) << 7 | vel,
        ((off << 2 | 2) << 7 | pitch) << 7 | NOTE_OFF_VELOCITY,
        ((down << 2 | 1) << 7 | PEDAL_CC) << 7 | PEDAL_DOWN_VALUE,
        ((up << 2 | 0) << 7 | PEDAL_CC) << 7 | PEDAL_UP_VALUE)))

    def messages() -> Iterator[mido.Message | mido.MetaMessage]:
        # made one at a time while mido encodes them: a list of Message objects would cost
        # hundreds of bytes a note at the end of a long file
        yield mido.MetaMessage("track_name", name="Piano", time=0)
        yield mido.MetaMessage("set_tempo", tempo=tempo, time=0)
        yield mido.MetaMessage("time_signature", numerator=4, denominator=4, time=0)
        yield mido.Message("program_change", channel=0, program=0, time=0)
        now = 0
        for event in map(int, events):  # one Python int at a time, not a list of them
            tick, kind, number, value = event >> 16, event >> 14 & 3, event >> 7 & 127, event & 127
            if kind >= 2:
                yield mido.Message("note_on" if kind == 3 else "note_off", channel=0,
                                   note=number, velocity=value, time=tick - now)
            else:
                yield mido.Message("control_change", channel=0, control=number, value=value,
                                   time=tick - now)
            now = tick
        yield mido.MetaMessage("end_of_track", time=0)

    mid = mido.MidiFile(type=0, ticks_per_beat=ticks_per_beat)
    mid.tracks.append(_Track(messages))
    atomic_write(path, lambda f: mid.save(file=f))


class _Track:
    """A track whose messages are generated as mido writes it (its writer only iterates a
    track); tests/test_midi.py checks the bytes equal those of a list-built mido.MidiTrack."""

    def __init__(self, messages: Callable[[], Iterator[mido.Message | mido.MetaMessage]]):
        self._messages = messages

    def __iter__(self) -> Iterator[mido.Message | mido.MetaMessage]:
        return self._messages()


# ----------------------------------------------------------------------------- reading


def _open_midi(path: str | os.PathLike) -> mido.MidiFile:
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise MidiError(f"{name}: file not found" if not os.path.exists(name)
                        else f"{name}: not a file")
    try:
        return mido.MidiFile(name)
    except (OSError, EOFError, ValueError, KeyError, IndexError, TypeError) as e:
        raise MidiError(f"{name}: not a readable MIDI file ({one_line(e)})") from None


def _merge_intervals(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def read_midi_with_pedal(path: str | os.PathLike
                         ) -> tuple[list[Note], list[tuple[float, float]]]:
    """Read a MIDI file: (notes as played, sustain-pedal intervals), times in seconds.

    Notes are not pedal-extended (see read_midi(extend_pedal=True)); they are sorted by
    (onset, pitch, offset). Pedal intervals are (down, up) pairs, sorted and non-overlapping.
    """
    mid = _open_midi(path)
    tpb = mid.ticks_per_beat
    tempo = 500000  # MIDI default: 120 bpm until the first set_tempo
    seg_tick, seg_sec = 0, 0.0  # start of the current tempo segment
    tick = 0

    def seconds(t: int) -> float:
        return seg_sec + mido.tick2second(t - seg_tick, tpb, tempo)

    # (channel, pitch) -> (onset tick, onset seconds, velocity, struck again at that tick)
    active: dict[tuple[int, int], tuple[int, float, int, bool]] = {}
    notes: list[Note] = []
    pedal_down: dict[int, float] = {}  # channel -> down time
    pedal: list[tuple[float, float]] = []

    for msg in mido.merge_tracks(mid.tracks, skip_checks=True):
        tick += msg.time
        if msg.type == "set_tempo":
            seg_sec, seg_tick, tempo = seconds(tick), tick, msg.tempo
            continue
        if msg.type not in ("note_on", "note_off", "control_change"):
            continue
        now = seconds(tick)
        if msg.type == "control_change":
            if msg.control != PEDAL_CC:
                continue
            if msg.value >= PEDAL_THRESHOLD:
                pedal_down.setdefault(msg.channel, now)
            elif msg.channel in pedal_down:
                start = pedal_down.pop(msg.channel)
                if now > start:
                    pedal.append((start, now))
            continue
        key = (msg.channel, msg.note)
        if msg.type == "note_on" and msg.velocity > 0:
            restrike = False
            if key in active:  # struck again while sounding: close the earlier note
                on_tick, on_sec, vel, _ = active.pop(key)
                if tick > on_tick:
                    notes.append(Note(on_sec, now, msg.note, vel))
                restrike = True
            active[key] = (tick, now, msg.velocity, restrike)
        elif key in active:  # note_off, or note_on with velocity 0
            on_tick, on_sec, vel, restrike = active[key]
            if tick == on_tick:
                # An off at the very tick of the attack: after a re-strike it belongs to the
                # note the re-strike already closed (writers that put the new note_on first);
                # otherwise the note has zero length and is dropped.
                if not restrike:
                    del active[key]
                continue
            del active[key]
            notes.append(Note(on_sec, now, msg.note, vel))

    end = seconds(tick)
    for (_, pitch), (on_tick, on_sec, vel, _) in active.items():
        if tick > on_tick:
            notes.append(Note(on_sec, end, pitch, vel))
    for start in pedal_down.values():
        if end > start:
            pedal.append((start, end))
    sort_notes(notes)
    return notes, _merge_intervals(pedal)


def read_midi(path: str | os.PathLike, extend_pedal: bool = False) -> list[Note]:
    """Read the notes of a MIDI file (seconds), optionally with offsets extended by the pedal.

    extend_pedal=True applies the sustain rule (docs/model.md, "Reference offsets"): a key
    released while CC64 >= 64 sounds until the pedal is released or the same key is struck
    again.
    """
    notes, pedal = read_midi_with_pedal(path)
    if extend_pedal and pedal:
        notes = sorted_notes(extend_by_pedal(notes, pedal))
    return notes


# ----------------------------------------------------------------------------- TSV / JSON

_COLUMN_ALIASES = {
    "onset": ("onset", "onset_s", "onset_sec", "onset_time", "onset_seconds", "start"),
    "offset": ("offset", "offset_s", "offset_sec", "offset_time", "offset_seconds", "end"),
    "pitch": ("pitch", "note", "midi_pitch", "key", "midi"),
    "velocity": ("velocity", "vel", "velocity_midi"),
}


def _parse_int(text: str) -> int:
    value = float(text)
    if not value.is_integer():
        raise ValueError(f"{text!r} is not an integer")
    return int(value)


def read_notes_tsv(path: str | os.PathLike) -> list[Note]:
    """Read a note list: tab- (or whitespace-) separated onset, offset, pitch[, velocity].

    The dev set's format (`onset_s offset_s pitch velocity` header, seconds, MIDI pitch and
    velocity) and MAESTRO-style headers (`onset offset note velocity`) map columns by name;
    without a header the columns are positional. Lines starting with '#' and blank lines are
    skipped; a missing velocity column gives velocity 64. Sorted by (onset, pitch). Pedal rows
    (pitch field `pedal`, module doc) are skipped: see read_pedals_tsv.
    """
    return _read_tsv(path)[0]


def read_pedals_tsv(path: str | os.PathLike) -> list[Pedal]:
    """Read the sustain-pedal rows (pitch field `pedal`) of a note list TSV as sorted
    (down, up) intervals in seconds; [] for a file without any (every pre-pedal file)."""
    return _read_tsv(path)[1]


def _read_tsv(path: str | os.PathLike) -> tuple[list[Note], list[Pedal]]:
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise MidiError(f"{name}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MidiError(f"{name}: cannot read note list ({one_line(e)})") from None

    cols = {"onset": 0, "offset": 1, "pitch": 2, "velocity": 3}
    notes: list[Note] = []
    pedals: list[Pedal] = []
    header_seen = False
    for lineno, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if not header_seen and not notes:
            header_seen = True
            try:
                float(fields[0])
            except ValueError:  # a header line: map the columns by name
                lower = [x.lower() for x in fields]
                cols = {}
                for col, aliases in _COLUMN_ALIASES.items():
                    found = [i for i, x in enumerate(lower) if x in aliases]
                    if found:
                        cols[col] = found[0]
                missing = [c for c in ("onset", "offset", "pitch") if c not in cols]
                if missing:
                    raise MidiError(f"{name}:{lineno}: header {fields} lacks column(s) "
                                    f"{', '.join(missing)}") from None
                continue
        if len(fields) > cols["pitch"] and fields[cols["pitch"]] == TSV_PEDAL:
            try:
                down, up = float(fields[cols["onset"]]), float(fields[cols["offset"]])
            except (ValueError, IndexError) as e:
                raise MidiError(f"{name}:{lineno}: bad pedal line {line.strip()!r} ({e})") \
                    from None
            pedals.append((down, up))
            continue
        try:
            onset = float(fields[cols["onset"]])
            offset = float(fields[cols["offset"]])
            pitch = _parse_int(fields[cols["pitch"]])
            vcol = cols.get("velocity")
            velocity = _parse_int(fields[vcol]) if vcol is not None and vcol < len(fields) \
                else 64
        except (ValueError, IndexError) as e:
            raise MidiError(f"{name}:{lineno}: bad note line {line.strip()!r} ({e})") from None
        notes.append(Note(onset, offset, pitch, velocity))
    return sort_notes(notes), sorted(pedals)


def _fmt_time(t: float) -> str:
    return f"{t:.6f}"


def write_notes_tsv(notes: Iterable[Note], path: str | os.PathLike,
                    pedals: Iterable[Pedal] = ()) -> None:
    """Write notes as TSV in the dev set's format: header `onset_s offset_s pitch velocity`.

    Times in seconds with 6 decimals (1 us), sorted by (onset, pitch). Pedal intervals, when
    given, follow the notes as rows `down up pedal <empty>` (module doc), sorted and merged;
    a bad interval raises a one-line ValueError and nothing is written. Written atomically.
    """
    merged = _pedal_list(pedals)
    rows = sorted_notes(notes)
    text = "\t".join(TSV_HEADER) + "\n" + "".join(
        f"{_fmt_time(n.onset)}\t{_fmt_time(n.offset)}\t{int(n.pitch)}\t{int(n.velocity)}\n"
        for n in rows) + "".join(
        f"{_fmt_time(down)}\t{_fmt_time(up)}\t{TSV_PEDAL}\t\n" for down, up in merged)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_notes_json(notes: Iterable[Note], path: str | os.PathLike,
                     metadata: dict | None = None, pedals: Iterable[Pedal] | None = None
                     ) -> None:
    """Write notes as JSON: {"notes": [{"onset", "offset", "pitch", "velocity"}, ...]}.

    Times in seconds (rounded to 1 us), sorted by (onset, pitch). `pedals`, when not None, is
    stored under "pedals" as [{"onset": down, "offset": up}, ...], sorted and merged (an empty
    list as []); a bad interval raises a one-line ValueError and nothing is written.
    `metadata`, when given, is stored under "metadata" (it must be JSON-serialisable). Written
    atomically.
    """
    merged = None if pedals is None else _pedal_list(pedals)
    rows = sorted_notes(notes)
    doc: dict = {"notes": [{"onset": round(float(n.onset), 6), "offset": round(float(n.offset), 6),
                            "pitch": int(n.pitch), "velocity": int(n.velocity)} for n in rows]}
    if merged is not None:
        doc["pedals"] = [{"onset": round(down, 6), "offset": round(up, 6)}
                         for down, up in merged]
    if metadata is not None:
        doc["metadata"] = metadata
    text = json.dumps(doc, indent=1) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _json_rows(path: str | os.PathLike, key: str, make: Callable[[dict], object]) -> list:
    """The rows under `key` of a notes JSON (a bare list holds notes only), each made into an
    object; a one-line MidiError naming the file otherwise."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            doc = json.load(f)
        rows = doc.get(key, []) if isinstance(doc, dict) else doc if key == "notes" else []
        return [make(r) for r in rows]
    except FileNotFoundError:
        raise MidiError(f"{name}: file not found") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise MidiError(f"{name}: not a pianolm note list ({one_line(e)})") from None


def read_notes_json(path: str | os.PathLike) -> list[Note]:
    """Read notes written by write_notes_json (also accepts a bare list of note objects)."""
    return sort_notes(_json_rows(path, "notes", lambda r: Note(
        float(r["onset"]), float(r["offset"]), int(r["pitch"]), int(r.get("velocity", 64)))))


def read_pedals_json(path: str | os.PathLike) -> list[Pedal]:
    """Read the sustain-pedal intervals written by write_notes_json as sorted (down, up) pairs
    in seconds; [] when the file has no "pedals" key (or is a bare list of notes)."""
    return sorted(_json_rows(path, "pedals", lambda r: (float(r["onset"]), float(r["offset"]))))
