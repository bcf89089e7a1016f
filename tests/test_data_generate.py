"""Generated material: ranges (pitch, velocity, density), pedal, determinism, playability."""

from __future__ import annotations

import numpy as np
import pytest

from pianolm.export.data.common import (
    Piece,
    crop,
    limit_density,
    max_density,
    merge_pedal,
    tidy_notes,
)
from pianolm.export.data.generate import KINDS, GenConfig, generate_piece
from pianolm.runtime.notes import Note

SEEDS = range(12)


@pytest.fixture(scope="module")
def pieces() -> list[Piece]:
    return [generate_piece(20.0, seed) for seed in SEEDS]


def test_ranges(pieces):
    for p in pieces:
        assert p.notes, p.name
        assert all(21 <= n.pitch <= 108 for n in p.notes)
        assert all(10 <= n.velocity <= 127 for n in p.notes)
        assert all(0.0 <= n.onset < 20.0 and n.offset > n.onset for n in p.notes)
        assert max_density(p.notes) <= 30


def test_material_is_varied(pieces):
    vel = np.array([n.velocity for p in pieces for n in p.notes])
    assert vel.min() <= 20 and vel.max() >= 115  # wide velocity range
    assert np.percentile(vel, 90) - np.percentile(vel, 10) > 40
    kinds = {k for p in pieces for k in p.meta["kinds"]}
    assert kinds == set(KINDS)
    assert max(max_density(p.notes) for p in pieces) >= 20  # fast passages exist
    assert sum(bool(p.pedal) for p in pieces) >= len(pieces) // 3  # pedal is common
    pitches = np.array([n.pitch for p in pieces for n in p.notes])
    assert pitches.min() < 36 and pitches.max() > 90


def test_pedal_intervals_are_clean(pieces):
    for p in pieces:
        for (d, u), nxt in zip(p.pedal, p.pedal[1:] + [(np.inf, np.inf)], strict=True):
            assert 0 <= d < u <= nxt[0]


def test_same_key_never_overlaps(pieces):
    for p in pieces:
        last: dict[int, Note] = {}
        for n in sorted(p.notes):
            if n.pitch in last:
                assert last[n.pitch].offset <= n.onset, (last[n.pitch], n)
            last[n.pitch] = n


def test_deterministic_and_seed_dependent():
    a, b, c = generate_piece(8.0, 5), generate_piece(8.0, 5), generate_piece(8.0, 6)
    assert a.notes == b.notes and a.pedal == b.pedal
    assert a.notes != c.notes


def test_config_limits_are_obeyed():
    cfg = GenConfig(min_velocity=40, max_velocity=80, max_density=12, low=48, high=84,
                    kinds=("run", "polyphony"))
    for seed in range(4):
        p = generate_piece(10.0, seed, cfg)
        assert all(48 <= n.pitch <= 84 and 40 <= n.velocity <= 80 for n in p.notes)
        assert max_density(p.notes) <= 12


def test_helpers():
    notes = [Note(0.0, 1.0, 60, 80), Note(0.5, 0.9, 60, 90), Note(0.51, 0.6, 60, 50),
             Note(0.2, 0.3, 10, 300)]
    tidy = tidy_notes(notes)
    assert [(n.pitch, n.velocity) for n in tidy] == [(60, 80), (22, 127), (60, 90)]
    assert tidy[0].offset <= 0.5  # cut before the re-strike
    assert merge_pedal([(1, 2), (0, 1.5), (3, 3.01)], min_length=0.05) == [(0, 2)]
    dense = [Note(i / 100, i / 100 + 0.05, 60 + i % 12, 64) for i in range(300)]
    assert max_density(limit_density(dense, 30)) <= 30
    piece = Piece([Note(1.0, 2.0, 60), Note(3.0, 9.0, 62)], [(0.5, 4.0)])
    c = crop(piece, 2.5, 5.0)
    assert c.notes == [Note(0.5, 6.5, 62)] and c.pedal == [(0.0, 1.5)]
