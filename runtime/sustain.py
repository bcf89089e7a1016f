"""Note offsets and the sustain pedal: the two conventions, and the rule between them.

    convert_offsets(notes, pedals, given="key", wanted="sounding")  # notes held by the pedal

A note's offset can mean two things (OFFSETS):
- "sounding": the note lasts while it sounds: a key released while the sustain pedal is down
  is held until the pedal goes up or the same key is struck again. The convention of MAESTRO
  evaluation with the pedal, of pianolm's own training targets, and of Kong et al.'s training
  (his data generator builds targets with `extend_pedal=True`).
- "key": the note ends where its key is released, whatever the pedal does (what people writing
  scores ask for).

A model's notes come in one of them (manifest `encoder.rolls.offsets`, `offsets_of`). Going
from "key" to "sounding" needs the pedal and is exact (`extend_by_pedal`, the one
implementation of the rule: references, training targets and the renderer call it too). Going
back is not possible: a sounding offset no longer says where the key went up.

Standard library only: the runtime never imports torch.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from .notes import Note, Pedal, sort_notes

if TYPE_CHECKING:
    from .manifest import Manifest

SOUNDING, KEY = "sounding", "key"
OFFSETS = (SOUNDING, KEY)  # a model's offset convention, and what --sustain asks for


class SustainError(ValueError):
    """A --sustain choice the model's notes cannot give; the message is one line."""


def extend_by_pedal(notes: Iterable[Note], pedal: Iterable[Pedal]) -> list[Note]:
    """Extend offsets by the sustain pedal: "key" offsets -> "sounding" ones.

    `pedal` holds (down, up) times in seconds; overlapping intervals are merged. A note released
    while the pedal is down (down <= offset < up) is held until the pedal goes up or its key is
    struck again, whichever comes first; offsets never get shorter. Order is kept.
    """
    notes = list(notes)
    intervals: list[list[float]] = []
    for down, up in sorted((d, u) for d, u in pedal if u > d):
        if intervals and down < intervals[-1][1]:
            intervals[-1][1] = max(intervals[-1][1], up)
        else:
            intervals.append([down, up])
    downs = [down for down, _ in intervals]
    onsets: dict[int, list[float]] = {}
    for note in notes:
        onsets.setdefault(note.pitch, []).append(note.onset)
    for times in onsets.values():
        times.sort()

    out = []
    for note in notes:
        i = bisect_right(downs, note.offset) - 1
        if i < 0 or note.offset >= intervals[i][1]:
            out.append(note)
            continue
        held = intervals[i][1]
        later = onsets[note.pitch]
        j = bisect_right(later, note.onset)
        if j < len(later):
            held = min(held, later[j])
        out.append(replace(note, offset=max(note.offset, held)))
    return out


def offsets_of(manifest: Manifest, decoder: str | None = None) -> str:
    """The offset convention of the notes `decoder` (None: the manifest's default) reads from
    the model: the rolls' own (`encoder.rolls.offsets`) for "rolls"; "sounding" for the LM
    stages, which pianolm trains on pedal-extended targets (export/train/examples.py)."""
    rolls = manifest.encoder.rolls
    if (decoder or manifest.default_decoder) == "rolls" and rolls is not None:
        return rolls.offsets
    return SOUNDING


def check_sustain(given: str, wanted: str) -> None:
    """SustainError (one line) unless notes of convention `given` can be given as `wanted`."""
    if wanted not in OFFSETS:
        raise SustainError(f"sustain {wanted!r}: choose one of {', '.join(OFFSETS)}")
    if given == SOUNDING and wanted == KEY:
        raise SustainError("sustain 'key': this model's note offsets already include the "
                           "pedal (its convention is 'sounding'), so the key releases are "
                           "not known to it")


def convert_offsets(notes: list[Note], pedals: Iterable[Pedal], given: str, wanted: str
                    ) -> list[Note]:
    """`notes` of convention `given` in convention `wanted`: as they are where the two agree,
    extended by `pedals` from "key" to "sounding"; SustainError from "sounding" to "key"."""
    check_sustain(given, wanted)
    # extending can reorder two notes of one onset and pitch: keep NOTE_ORDER
    return notes if given == wanted else sort_notes(extend_by_pedal(notes, pedals))
