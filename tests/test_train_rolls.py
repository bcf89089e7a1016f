"""Roll decoding (runtime/rolls.py) recovers notes from rolls made from those notes."""

from dataclasses import replace

import numpy as np
import pytest

from pianolm.export.data.common import tidy_notes
from pianolm.export.train.evaluate import evaluate
from pianolm.export.train.targets import TargetConfig, roll_targets
from pianolm.runtime.notes import Note
from pianolm.runtime.rolls import RollDecodeConfig, decode_rolls, find_peaks, join_segments
from pianolm.runtime.sustain import extend_by_pedal


def _grid_notes(seed: int, seconds: float = 28.0, n: int = 200) -> list[Note]:
    rng = np.random.default_rng(seed)
    notes = []
    for _ in range(n):
        on = int(rng.integers(0, int(seconds * 100))) / 100
        notes.append(Note(on, on + int(rng.integers(5, 200)) / 100, int(rng.integers(21, 109)),
                          int(rng.integers(1, 128))))
    notes = tidy_notes(notes)  # playable: one key never sounds twice
    notes = [Note(round(x.onset, 2), round(x.offset, 2), x.pitch, x.velocity) for x in notes]
    return extend_by_pedal(notes, [(5.0, 7.5), (12.0, 12.8)])


def _rolls(notes, fps, soft=True):
    t = roll_targets(notes, int(30 * fps) + 1, TargetConfig(float(fps), soft=soft))
    return {k: t.as_dict()[k] for k in ("onset", "offset", "frame", "velocity")}


@pytest.mark.parametrize("fps", [100, 50])
@pytest.mark.parametrize("soft", [True, False])
def test_perfect_rolls_give_perfect_scores(fps, soft):
    notes = _grid_notes(fps + soft)
    pred = decode_rolls(_rolls(notes, fps, soft), fps)
    scores = evaluate(pred, notes)
    assert len(pred) == len(notes)
    for m in ("onset_f", "onset_offset_f", "onset_offset_velocity_f"):
        assert scores[m] == 1.0, (m, scores)


def test_soft_rolls_recover_grid_onsets_exactly():
    notes = _grid_notes(3)
    for fps in (100, 50):  # 50 fps: half-frame onsets come back from the triangle's flanks
        pred = decode_rolls(_rolls(notes, fps), fps)
        key = lambda n: (n.pitch, n.onset)  # noqa: E731
        for a, b in zip(sorted(pred, key=key), sorted(notes, key=key)):
            assert a.pitch == b.pitch and a.onset == pytest.approx(b.onset, abs=1e-6)
            assert a.velocity == b.velocity


def test_noisy_rolls_still_decode_well():
    notes = _grid_notes(7)
    rng = np.random.default_rng(0)
    rolls = {k: np.clip(0.9 * v + rng.normal(0, 0.04, v.shape) + 0.03, 0, 1).astype(np.float32)
             for k, v in _rolls(notes, 100).items()}
    scores = evaluate(decode_rolls(rolls, 100, RollDecodeConfig(frame_threshold=0.3)), notes)
    assert scores["onset_f"] > 0.97
    assert scores["onset_offset_f"] > 0.9


def test_peaks_plateau_gives_one_peak():
    x = np.array([0, 0.4, 0.8, 0.8, 0.4, 0, 0.5, 0], np.float32)[:, None]
    assert np.flatnonzero(find_peaks(x, 0.3, 2)[:, 0]).tolist() == [3, 6]


def test_join_segments_drops_the_shared_frame():
    seg = np.arange(3 * 1001, dtype=np.float32).reshape(3, 1001, 1) * np.ones((1, 1, 88))
    joined = join_segments({"onset": seg}, 100)["onset"]
    assert joined.shape == (3001, 88)
    assert joined[999, 0] == 999 and joined[1000, 0] == 1001  # frame 1000 of segment 0 dropped
    assert join_segments({"onset": seg}, 100, n_samples=25 * 16000)["onset"].shape[0] == 2501


def test_empty_rolls():
    z = np.zeros((100, 88), np.float32)
    assert decode_rolls({"onset": z, "offset": z, "frame": z, "velocity": z}, 100) == []


def test_velocity_curve_maps_the_roll_and_survives_json():
    cfg = RollDecodeConfig(velocity_curve=(0.01, 0.0, 10.0))
    assert cfg.velocity(0.5) == round(0.01 * 63.5**2 + 10) and cfg.velocity(1.0) == 127
    assert RollDecodeConfig().velocity(0.5) == 64 and RollDecodeConfig().velocity(0.0) == 1
    assert RollDecodeConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["velocity_curve"] == [0.01, 0.0, 10.0]  # a JSON list
    notes = _grid_notes(4)
    rolls = _rolls(notes, 50)
    plain, curved = decode_rolls(rolls, 50), decode_rolls(rolls, 50, cfg)
    assert [(n.onset, n.pitch) for n in plain] == [(n.onset, n.pitch) for n in curved]
    assert [cfg.velocity(n.velocity / 127) for n in plain] == [n.velocity for n in curved]


def test_tuning_fits_a_velocity_curve_that_undoes_a_bent_roll():
    """A velocity roll that reads v as sqrt(127 v) + noise: loud notes squeezed together, which
    mir_eval's own per-piece line cannot undo. Tuning fits the bend back (~v^2 / 127) and keeps
    it because onset+offset+velocity F1 rises; a linear squeeze gains nothing there, so it gets
    no curve; nor does a roll whose velocity falls as the reference rises."""
    from pianolm.export.train.encoder import ScoredPiece
    from pianolm.export.train.thresholds import fit_velocity_curve, tune_roll_thresholds

    rng = np.random.default_rng(0)
    grids = dict(onset_grid=(0.5,), frame_grid=(0.5,), offset_grid=(0.5,))

    def pieces(squash):
        out = []
        for seed in range(3):
            notes = _grid_notes(10 + seed)
            rolls = _rolls(notes, 50)
            v = rolls["velocity"] * 127
            bent = np.where(v > 0, squash(v) + rng.normal(0, 0.5, v.shape), 0) / 127
            out.append(ScoredPiece(str(seed), {**rolls, "velocity": bent.astype(np.float32)},
                                   notes))
        return out

    bent = pieces(lambda v: np.sqrt(127 * v))
    cfg, scores = tune_roll_thresholds(bent, 50, **grids)
    a, b, c = cfg.velocity_curve
    assert 0.6 / 127 < a < 1.4 / 127, cfg.velocity_curve
    plain = [evaluate(decode_rolls(p.rolls, 50, replace(cfg, velocity_curve=())), p.reference)
             for p in bent]
    assert scores["onset_offset_velocity_f"] > np.mean(
        [s["onset_offset_velocity_f"] for s in plain]) + 0.05
    assert tune_roll_thresholds(pieces(lambda v: 40 + 0.3 * v), 50, **grids)[0].velocity_curve == ()
    falling = [ScoredPiece(p.name, {**p.rolls, "velocity": (1.0 - p.rolls["velocity"])},
                           p.reference) for p in bent]
    assert fit_velocity_curve(falling, 50, cfg) == ()
