"""The Note type shared by every part of pianolm."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from operator import attrgetter


@dataclass(frozen=True, order=True, slots=True)  # slots: a 3 h file holds ~70k of them
class Note:
    """One piano note. Times in seconds; pitch is a MIDI key number (21..108)."""

    onset: float
    offset: float
    pitch: int
    velocity: int = 64


# A sustain-pedal interval: (down, up) in seconds, as runtime/midi.py read_midi_with_pedal gives.
Pedal = tuple[float, float]


# The one order of every note list pianolm reads, writes or returns.
NOTE_ORDER = ("onset", "pitch", "offset", "velocity")


def sort_notes(notes: list[Note]) -> list[Note]:
    """Sort `notes` in place by NOTE_ORDER and return the list. One stable sort per field, the
    last field first, gives the order a tuple key would, without a key tuple per note (a long
    file's notes are sorted at its end, when memory peaks)."""
    for name in reversed(NOTE_ORDER):
        notes.sort(key=attrgetter(name))
    return notes


def sorted_notes(notes: Iterable[Note]) -> list[Note]:
    """A new list of `notes` in NOTE_ORDER."""
    return sort_notes(list(notes))
