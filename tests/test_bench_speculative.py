"""`pianolm bench`'s speculative sweep: drafts that agree with the forced notes at a set rate.

- AgreeingDraft: at agreement 1 every guess is the codec's, at 0 none is;
- teacher-forced speculative decodes return the codec's tokens (run_once raises otherwise) at
  every agreement, batch 1 and 3, with rows that drop out or stay; exact drafts cost fewer
  decoder calls than plain greedy, and no draft costs more calls than a token each;
- the summary's speedup-vs-agreement sweep and its target read the entries of one run.
"""

from __future__ import annotations

import pytest

from pianolm.export.bench.drafts import AgreeingDraft, offsets_by_note, onset_notes
from pianolm.export.bench.measure import run_once
from pianolm.export.bench.summary import SPECULATIVE_AT, speculative_sweep, summarize
from pianolm.export.bench.workload import Clip, Window, Workload
from pianolm.runtime import vocab as V
from tests.fake_backend import FakeBackend
from tests.test_bench import KNOWN


def _rows(batch: int):
    clip = Clip("known", KNOWN, None)
    windows = [Window("known", s, 0, 0) for s in (20.0, 17.0, 24.0)]
    return Workload([clip], windows).rows(batch)


def test_exact_drafts_are_the_codecs_guesses_and_wrong_ones_none_of_them():
    row = _rows(1)[0]
    notes = onset_notes(row.targets["onset"])
    offsets = offsets_by_note(row.tokens["offset"][2:])
    exact = AgreeingDraft.from_row(row, 1.0, seed=0)
    assert exact.onsets == notes
    assert [exact.velocity(t, p) for t, p in notes] == row.targets["velocity"]
    assert {n: exact.offset(*n, -1) for n in offsets} == offsets
    wrong = AgreeingDraft.from_row(row, 0.0, seed=0)
    assert [t for t, _ in wrong.onsets] == [t for t, _ in notes]  # times right, keys wrong
    assert not set(wrong.onsets) & set(notes)
    assert all(wrong.velocity(t, p) != v for (t, p), v in zip(notes, row.targets["velocity"]))
    assert all(wrong.offset(*n, -1) != off for n, off in offsets.items())
    with pytest.raises(ValueError, match="agreement"):
        AgreeingDraft.from_row(row, 1.5, seed=0)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("droppable", [False, True])
@pytest.mark.parametrize("concurrent", [False, True])
def test_forced_speculative_decodes_give_the_codecs_tokens(batch, droppable, concurrent):
    rows = _rows(batch)
    backend = FakeBackend(droppable=droppable)
    plain = run_once(backend, rows, "hierarchical", concurrent)
    calls = {}
    for agreement in (0.0, 0.5, 1.0):
        drafts = [AgreeingDraft.from_row(r, agreement, seed=i) for i, r in enumerate(rows)]
        run = run_once(backend, rows, "hierarchical", concurrent, drafts=drafts)
        calls[agreement] = sum(s.calls for s in run.calls.values())
        assert {s: c.tokens for s, c in run.calls.items()} == \
            {s: c.tokens for s, c in plain.calls.items()}
    greedy = sum(s.calls for s in plain.calls.values())
    assert calls[1.0] < greedy
    assert calls[0.0] <= greedy  # every call still keeps the token greedy decoding chose
    drafted = run.calls["onset"]
    assert drafted.accepted == drafted.drafted > 0  # agreement 1: every draft token kept


def _entry(agreement, ms, calls_per_note, backend="ort-fp32"):
    return {"preset": "small", "encoder": "hppnet", "backend": backend, "mode": "hierarchical",
            "schedule": "sequential", "batch": 1, "agreement": agreement,
            "decode_ms": {"median": ms}, "decoder_calls": {"calls_per_note": calls_per_note,
                                                           "tokens_per_call": 1.0}}


def test_sweep_and_target_compare_each_agreement_with_plain_greedy_in_the_same_run():
    results = [_entry(None, 900.0, 4.0), _entry(None, 9000.0, 4.0, "torch-nocache"),
               _entry(0.5, 600.0, 2.5), _entry(SPECULATIVE_AT, 300.0, 1.2),
               _entry(1.0, 250.0, 1.0)]
    results[1]["schedule"] = "sequential"
    ctx = {"schedules": {"ort-fp32": "sequential"}}
    sweep = speculative_sweep(results, "small", "ort-fp32", ctx)
    assert [s["agreement"] for s in sweep] == [0.5, SPECULATIVE_AT, 1.0]
    assert [s["speedup"] for s in sweep] == [1.5, 3.0, 3.6]
    assert sweep[0]["plain_calls_per_note"] == 4.0 and sweep[1]["calls_per_note"] == 1.2
    summary = summarize(results, ["small"], ctx)
    assert summary["speculative_vs_greedy"]["measured"] == 3.0
    assert summary["speculative_vs_greedy"]["pass"] is True
    assert summary["speculative_vs_authors_decode"]["measured"] == 30.0  # 9000 / 300
    assert summary["speculative_vs_authors_decode"]["pass"] is False
    # the plain entries' targets never read a speculative entry
    assert summary["runtime_vs_authors_decode"]["measured"] == 10.0
    assert speculative_sweep(results, "small", "ort-int8", ctx) == []


def test_wrong_onset_drafts_keep_the_grammar_order():
    """A wrong key at a note's time: the draft stays sorted and one note per (tick, key)."""
    row = _rows(1)[0]
    for seed in range(5):
        onsets = AgreeingDraft.from_row(row, 0.5, seed).onsets
        assert onsets == sorted(set(onsets))
        assert all(V.MIN_PITCH <= p <= V.MAX_PITCH for _, p in onsets)
