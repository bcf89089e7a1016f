"""Piano-roll targets land on the right frames, at both encoders' frame rates."""

import numpy as np
import pytest

from pianolm.export.train.targets import TargetConfig, roll_targets
from pianolm.runtime.notes import Note
from pianolm.runtime.sustain import extend_by_pedal

KEY = 60 - 21


def test_soft_targets_at_100_fps():
    t = roll_targets([Note(1.0, 1.5, 60, 100)], 301, TargetConfig(100.0))
    on = t.onset[:, KEY]
    assert on[100] == pytest.approx(1.0)
    assert on[99] == pytest.approx(0.8) and on[101] == pytest.approx(0.8)
    assert on[96] == pytest.approx(0.2) and on[95] == 0.0 and on[105] == 0.0
    assert t.offset[150, KEY] == pytest.approx(1.0) and t.offset[148, KEY] == pytest.approx(0.6)
    assert t.frame[:, KEY].nonzero()[0].tolist() == list(range(100, 150))
    assert np.flatnonzero(t.velocity_mask[:, KEY]).tolist() == [99, 100, 101]
    assert t.velocity[100, KEY] == pytest.approx(100 / 127)
    # nothing on other keys
    assert t.onset[:, KEY + 1].sum() == 0 and t.frame[:, KEY - 1].sum() == 0


def test_binary_targets_and_crop_start():
    t = roll_targets([Note(1.0, 1.5, 60, 100)], 101, TargetConfig(100.0, soft=False),
                     start=0.5)
    assert np.flatnonzero(t.onset[:, KEY]).tolist() == [50]
    assert np.flatnonzero(t.offset[:, KEY]).tolist() == [100]
    assert np.flatnonzero(t.frame[:, KEY]).tolist() == list(range(50, 100))


def test_half_frame_onset_at_50_fps_is_a_plateau():
    # 1.01 s = frame 50.5 at 50 fps: the two neighbouring frames share the triangle's top
    t = roll_targets([Note(1.01, 2.0, 60)], 201, TargetConfig(50.0))
    assert t.onset[50, KEY] == pytest.approx(t.onset[51, KEY]) == pytest.approx(0.8)
    assert t.onset[49, KEY] == pytest.approx(0.4)


def test_note_sounding_before_the_crop_has_frames_but_no_onset():
    t = roll_targets([Note(0.2, 2.0, 60)], 101, TargetConfig(100.0), start=1.0)
    assert t.onset[:, KEY].sum() == 0
    assert np.flatnonzero(t.frame[:, KEY]).tolist() == list(range(0, 100))
    assert t.offset[100, KEY] == pytest.approx(1.0)


def test_pedal_extension_and_restrike():
    notes = [Note(1.0, 1.2, 60), Note(2.0, 2.3, 60), Note(1.0, 1.2, 64)]
    ext = extend_by_pedal(notes, [(1.1, 3.0)])
    t = roll_targets(ext, 401, TargetConfig(100.0))
    # key 60 is held by the pedal until it is struck again at 2.0, then until the release
    assert np.flatnonzero(t.frame[:, KEY]).tolist() == list(range(100, 300))
    assert t.offset[200, KEY] == pytest.approx(1.0) and t.offset[300, KEY] == pytest.approx(1.0)
    assert np.flatnonzero(t.frame[:, 64 - 21]).tolist() == list(range(100, 300))
