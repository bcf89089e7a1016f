"""The Note type shared by every part of pianolm."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True, slots=True)  # slots: a 3 h file holds ~70k of them
class Note:
    """One piano note. Times in seconds; pitch is a MIDI key number (21..108)."""

    onset: float
    offset: float
    pitch: int
    velocity: int = 64
