"""The Note type shared by every part of pianolm."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Note:
    """One piano note. Times in seconds; pitch is a MIDI key number (21..108)."""

    onset: float
    offset: float
    pitch: int
    velocity: int = 64
