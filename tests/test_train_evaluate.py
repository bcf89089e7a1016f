"""evaluate(): mir_eval scores on identical and hand-made note lists."""

import pytest

from pianolm.export.train.evaluate import evaluate, mean_scores
from pianolm.runtime.notes import Note

REF = [Note(1.0, 2.0, 60, 40), Note(2.0, 2.5, 62, 60), Note(3.0, 4.0, 64, 80),
       Note(5.0, 6.0, 65, 100)]


def test_identical_notes_score_one():
    s = evaluate(REF, REF)
    for m in ("onset", "onset_offset", "onset_offset_velocity"):
        assert s[f"{m}_p"] == s[f"{m}_r"] == s[f"{m}_f"] == 1.0


def test_hand_made_case():
    pred = [
        Note(1.0, 2.0, 60, 40),  # exact
        Note(2.03, 2.52, 62, 60),  # onset 30 ms late (in tolerance), offset fine
        Note(3.07, 4.0, 64, 80),  # onset 70 ms late: no match
        Note(5.0, 5.3, 65, 100),  # onset right, offset 0.7 s early: onset-only match
        Note(7.0, 7.5, 70, 64),  # extra note
    ]
    s = evaluate(pred, REF)
    assert s["onset_p"] == pytest.approx(3 / 5) and s["onset_r"] == pytest.approx(3 / 4)
    assert s["onset_f"] == pytest.approx(2 * 3 / (5 + 4))
    assert s["onset_offset_p"] == pytest.approx(2 / 5)
    assert s["onset_offset_r"] == pytest.approx(2 / 4)
    # velocities of the two onset+offset matches are exact
    assert s["onset_offset_velocity_f"] == pytest.approx(2 * 2 / (5 + 4))
    assert s["n_pred"] == 5 and s["n_ref"] == 4


def test_velocity_score_is_affine_invariant_and_needs_offsets():
    # mir_eval rescales estimated velocities to the reference by least squares
    pred = [Note(n.onset, n.offset, n.pitch, n.velocity // 2 + 5) for n in REF]
    assert evaluate(pred, REF)["onset_offset_velocity_f"] == 1.0
    late = [Note(n.onset, n.offset + 1.0, n.pitch, n.velocity) for n in REF]
    s = evaluate(late, REF)
    assert s["onset_f"] == 1.0 and s["onset_offset_f"] == 0.0
    assert s["onset_offset_velocity_f"] == 0.0


def test_offset_tolerance_is_20_percent_or_50_ms():
    ref = [Note(1.0, 3.0, 60)]  # 2 s long: tolerance 0.4 s
    assert evaluate([Note(1.0, 3.35, 60)], ref)["onset_offset_f"] == 1.0
    assert evaluate([Note(1.0, 3.45, 60)], ref)["onset_offset_f"] == 0.0
    short = [Note(1.0, 1.1, 60)]  # 0.1 s long: the 50 ms minimum applies
    assert evaluate([Note(1.0, 1.14, 60)], short)["onset_offset_f"] == 1.0


def test_empty_lists():
    assert evaluate([], [])["onset_f"] == 1.0
    assert evaluate([], REF)["onset_f"] == 0.0 and evaluate(REF, [])["onset_r"] == 0.0
    assert mean_scores([{"a": 1.0}, {"a": 0.0}]) == {"a": 0.5}
