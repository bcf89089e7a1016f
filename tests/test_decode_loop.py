"""The hierarchical decode loop on a fake model: grammar, termination, carried-note rounds, and
independence from how segments are batched."""

import numpy as np
import pytest

from pianolm.runtime import vocab as V
from pianolm.runtime.decode import OpenNote, RowSpec, decode_batch, to_notes
from pianolm.runtime.tokens import decode_onset
from tests.fake_backend import FakeBackend


def _audio(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 160000)).astype(np.float32)


def _decode_one_by_one(backend, audio, max_notes):
    results, carry = [], []
    for k in range(len(audio)):
        (res,) = decode_batch(backend, audio[k:k + 1], [RowSpec(k, None, carry)], max_notes)
        results.append(res)
        carry = res.carry_out
    return results


@pytest.mark.parametrize("seed", range(4))
def test_batched_file_equals_segment_by_segment(seed):
    backend, audio = FakeBackend(), _audio(5, seed)
    rows = [RowSpec(k, k - 1 if k else None) for k in range(5)]
    batched = decode_batch(backend, audio, rows, max_notes=10)
    single = _decode_one_by_one(backend, audio, max_notes=10)
    assert [b.tokens for b in batched] == [s.tokens for s in single]
    assert [b.carry_out for b in batched] == [s.carry_out for s in single]
    # The fake sustains often: make sure carried notes were exercised.
    assert any(V.NOTE_SUSTAIN in b.tokens["offset"][0::3] for b in batched)


def test_two_files_in_one_batch_equal_separate_runs():
    backend, audio = FakeBackend(), _audio(4, 7)
    # rows 0,2 are file A's segments 0,1; rows 1,3 are file B's segments 0,1
    rows = [RowSpec(0), RowSpec(0), RowSpec(1, 0), RowSpec(1, 1)]
    mixed = decode_batch(backend, audio, rows, max_notes=8)
    a = _decode_one_by_one(backend, audio[[0, 2]], 8)
    b = _decode_one_by_one(backend, audio[[1, 3]], 8)
    assert [m.tokens for m in mixed] == [a[0].tokens, b[0].tokens, a[1].tokens, b[1].tokens]


@pytest.mark.parametrize("seed", range(3))
def test_dropping_finished_rows_and_concurrency_change_no_token(seed):
    audio = _audio(6, seed)
    # two files of three segments, interleaved, so chains and carried rounds mix in one batch
    rows = [RowSpec(0), RowSpec(0), RowSpec(1, 0), RowSpec(1, 1), RowSpec(2, 2), RowSpec(2, 3)]
    runs = {}
    for droppable in (False, True):
        for concurrent in (False, True):
            backend = FakeBackend(droppable=droppable)
            res = decode_batch(backend, audio, rows, max_notes=12, concurrent=concurrent)
            runs[droppable, concurrent] = ([r.tokens for r in res], [r.carry_out for r in res],
                                           backend.work[0])
    reference = runs[False, False]
    for key, (tokens, carry, _) in runs.items():
        assert (tokens, carry) == reference[:2], key
    # finished rows stopped costing work once the backend could drop them
    assert runs[True, False][2] < runs[False, False][2]
    assert runs[True, True][2] == runs[True, False][2]


def test_grammar_holds_in_every_stage():
    res = decode_batch(FakeBackend(), _audio(3, 3),
                       [RowSpec(k, k - 1 if k else None) for k in range(3)], max_notes=12)
    for seg in res:
        on = seg.tokens["onset"]
        assert on[-1] == V.EOS
        notes = decode_onset(on)
        assert len(notes) <= 12
        assert notes == sorted(notes) and len(set(notes)) == len(notes)
        vel = seg.tokens["velocity"]
        assert len(vel) == 3 * len(notes)
        assert all(V.is_velocity(t) for t in vel[2::3])
        off = seg.tokens["offset"]
        own = [(V.token_time(t), V.token_pitch(p)) for t, p in zip(off[0:3 * len(notes):3],
                                                                   off[1:3 * len(notes):3])]
        assert own == notes
        for on_t, _, off_t in zip(off[0::3], off[1::3], off[2::3]):
            assert off_t == V.NOTE_SUSTAIN or (
                V.is_time(off_t) and (on_t == V.NOTE_SUSTAIN or off_t > on_t))


def test_note_limit_ends_the_onset_stage():
    backend = FakeBackend(bias={V.EOS: -100.0})  # a model that never says eos
    (res,) = decode_batch(backend, _audio(1), [RowSpec(0)], max_notes=5)
    assert len(decode_onset(res.tokens["onset"])) == 5 and res.tokens["onset"][-1] == V.EOS


def test_carry_in_order_is_owner_descending_then_pitch():
    carry = [OpenNote(-3, 60), OpenNote(-5, 40), OpenNote(-4, 70), OpenNote(-4, 50)]
    (res,) = decode_batch(FakeBackend(bias={V.EOS: 100.0}), _audio(1), [RowSpec(6, None, carry)])
    carried = [V.token_pitch(p) for on, p in zip(res.tokens["offset"][0::3],
                                                   res.tokens["offset"][1::3])
               if on == V.NOTE_SUSTAIN]
    assert carried == [40, 50, 70, 60]  # owners 5, 4, 4, 3


def test_flat_baseline_decodes_and_ends():
    res = decode_batch(FakeBackend(stages=("flat",)), _audio(2), [RowSpec(0), RowSpec(1, 0)],
                       max_notes=6)
    for seg in res:
        toks = seg.tokens["flat"]
        assert toks[-1] == V.EOS and (len(toks) - 1) % 4 == 0 and len(toks) <= 4 * 6 + 1


def test_decoded_segments_stitch_into_valid_notes():
    res = decode_batch(FakeBackend(), _audio(4, 5),
                       [RowSpec(k, k - 1 if k else None) for k in range(4)], max_notes=10)
    notes = to_notes(res, end=40.0)
    n_own = sum(len(decode_onset(r.tokens["onset"])) for r in res)
    assert len(notes) == n_own
    assert all(0 <= n.onset < n.offset <= 40.0 and 21 <= n.pitch <= 108 for n in notes)
    assert any(n.offset - n.onset > 10.0 for n in notes)  # carried through 2+ segments


def test_a_key_never_starts_again_within_repeat_ticks():
    """The onset grammar's re-strike rule (docs/tokens.md): key 60 may start again only
    REPEAT_TICKS after its last onset, and a time is offered only when some key may start at
    it (no dead end: the same tick again needs a free key above the previous pitch)."""
    from pianolm.runtime.grammar import REPEAT_TICKS, OnsetGrammar

    g = OnsetGrammar(batch=1, max_notes=100)
    last60 = None
    for tick in range(0, 3 * REPEAT_TICKS):
        assert g.mask()[0, V.time_token(tick)]
        g.update(np.array([V.time_token(tick)]))
        pitches = g.mask()[0, V.PITCH_BASE:V.VELOCITY_BASE]
        free = last60 is None or tick - last60 >= REPEAT_TICKS
        assert pitches[60 - V.MIN_PITCH] == free, tick
        key = 60 if free else 61 + tick  # another key when 60 is not free
        if free:
            last60 = tick
        g.update(np.array([V.pitch_token(key)]))
    assert last60 == 2 * REPEAT_TICKS

    g = OnsetGrammar(batch=1, max_notes=100)
    for tick, key in ((20, 108), (22, 107)):
        g.update(np.array([V.time_token(tick)]))
        g.update(np.array([V.pitch_token(key)]))
    times = g.mask()[0, V.TIME_BASE:V.PITCH_BASE]
    assert not times[22]  # the only key above 107 was struck 2 ticks ago
    assert times[23] and not times[:22].any()
