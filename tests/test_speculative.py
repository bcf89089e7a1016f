"""Speculative decoding (runtime/decode.py with drafts, runtime/speculative.py): the same tokens
as greedy decoding in every stage, whatever the draft, on ONNX Runtime and the PyTorch
reference; and what it rests on, rejected draft tokens leaving no trace
(StageSession.retract)."""

from __future__ import annotations

import numpy as np
import pytest

from pianolm.runtime import vocab as V
from pianolm.runtime.decode import (
    OpenNote,
    RowSpec,
    decode_flat,
    decode_offsets,
    decode_onsets,
    decode_velocities,
)
from pianolm.runtime.grammar import OnsetGrammar
from pianolm.runtime.ort_backend import OrtBackend
from pianolm.runtime.speculative import FlatDraft, SpeculativeStats, continuation
from tests.drafts import GuessDraft, offsets_by_note, onset_notes

pytest.importorskip("torch")
from pianolm.export.torch_backend import TorchBackend  # noqa: E402
from tests.test_alignment import aligned  # noqa: E402, F401 (a fixture: the time-aligned model)
from tests.test_export_manifest import older_copy  # noqa: E402


def _backends(system, folder):
    return {"ort": OrtBackend(folder, threads=1), "torch": TorchBackend(system),
            "torch-nocache": TorchBackend(system, use_cache=False)}


def _models(exported, aligned):  # noqa: F811
    return {"hier": (exported.hier, exported.dirs["hier"]), "aligned": aligned}


def _embeddings(backend, batch: int, seed: int) -> np.ndarray:
    audio = (0.1 * np.random.default_rng(seed).normal(size=(batch, 160000))).astype(np.float32)
    return backend.encode(audio)


@pytest.mark.parametrize("model", ["hier", "aligned"])
@pytest.mark.parametrize("kind", ["ort", "torch", "torch-nocache"])
def test_retracted_positions_are_padding(exported, aligned, model, kind):  # noqa: F811
    """A chunk fed whole and then retracted gives the logits (there and after) of the same
    chunk fed with those positions as padding: the semantics speculation needs."""
    system, folder = _models(exported, aligned)[model]
    backend = _backends(system, folder)[kind]
    emb = _embeddings(backend, 2, seed=1)
    rng = np.random.default_rng(2)
    chunk = np.array([[V.time_token(30), V.pitch_token(60), V.time_token(80), V.pitch_token(64)],
                      [V.time_token(5), V.pitch_token(40), V.time_token(9), V.pitch_token(41)]])
    drop = np.array([3, 1])
    kept = np.arange(4)[None, :] < (4 - drop)[:, None]
    a, b = backend.start("onset", emb), backend.start("onset", emb)
    prompt = np.array([[V.SOS, V.TASK_ONSET]] * 2)
    for s in (a, b):
        s.step(prompt, np.ones_like(prompt, dtype=bool))
    got = a.step_all(chunk, np.ones_like(chunk, dtype=bool))
    a.retract(drop)
    want = b.step_all(chunk, kept)
    np.testing.assert_allclose(got[kept], want[kept], atol=1e-5, rtol=0)
    # the last position, which both rows dropped, left the cache where the cache can cut
    assert a.rows.key_mask.shape[1] == 2 + 4 - (kind != "torch-nocache")
    for _ in range(3):  # later tokens see the kept positions only
        nxt = rng.integers(V.TIME_BASE, V.PITCH_BASE, size=(2, 1))
        ones = np.ones_like(nxt, dtype=bool)
        # a cut cache's softmax sums over fewer (masked) keys: float rounding differs
        np.testing.assert_allclose(a.step(nxt, ones), b.step(nxt, ones), atol=1e-4, rtol=0)


def test_retract_checks_its_argument(exported):
    backend = OrtBackend(exported.dirs["hier"], threads=1)
    s = backend.start("onset", _embeddings(backend, 2, seed=1))
    s.step_all(np.array([[V.SOS, V.TASK_ONSET]] * 2), np.ones((2, 2), dtype=bool))
    for bad in ([3, 0], [-1, 0], [1], [0.5, 0]):
        with pytest.raises(ValueError, match="drop must be ints"):
            s.retract(np.array(bad))


def test_old_step_graphs_say_to_re_export(exported, tmp_path):
    folder = older_copy(exported.dirs["hier"], tmp_path / "old", 5)
    backend = OrtBackend(folder, threads=1)
    s = backend.start("onset", _embeddings(backend, 1, seed=1))
    with pytest.raises(ValueError, match="format_version < 6.*re-export"):
        s.step_all(np.array([[V.SOS, V.TASK_ONSET]]), np.ones((1, 2), dtype=bool))


def _drafts(kind: str, greedy: list[list[int]], rng: np.random.Generator):
    notes = [onset_notes(t) for t in greedy]
    if kind == "exact":
        return notes
    if kind == "empty":
        return [[] for _ in notes]
    if kind == "longer":  # the LM's notes, then more it never emits
        return [n + [(990 + i, 60 + i) for i in range(5)] for n in notes]
    if kind == "wrong":  # every note a little off: nearly every draft token is rejected
        return [sorted({(min(t + 1, 999), p) for t, p in n}) for n in notes]
    # "mixed": half the notes dropped, some moved
    return [sorted({(t if rng.random() < 0.7 else min(t + 3, 999), p) for t, p in n
                    if rng.random() < 0.5}) for n in notes]


@pytest.mark.parametrize("model", ["hier", "aligned"])
@pytest.mark.parametrize("kind", ["ort", "torch"])
@pytest.mark.parametrize("batch", [1, 8])
def test_speculative_onsets_equal_greedy(exported, aligned, model, kind, batch):  # noqa: F811
    system, folder = _models(exported, aligned)[model]
    backend = _backends(system, folder)[kind]
    emb = _embeddings(backend, batch, seed=10 + batch)
    greedy = decode_onsets(backend, emb, max_notes=12)
    assert any(len(t) >= 7 for t in greedy)  # notes to draft, not only eos
    rng = np.random.default_rng(batch)
    for draft_kind in ("exact", "longer", "wrong", "mixed", "empty"):
        stats = SpeculativeStats()
        drafts = [GuessDraft(d) for d in _drafts(draft_kind, greedy, rng)]
        got = decode_onsets(backend, emb, 12, drafts, stats=stats)
        assert got == greedy, draft_kind
        assert stats.tokens == sum(map(len, greedy))
        if draft_kind == "exact":  # far fewer calls than one per token
            assert stats.acceptance == 1.0 and stats.tokens_per_call > 2, stats
        if draft_kind == "empty":  # a draft of no notes guesses eos, one token a call
            assert stats.drafted <= stats.calls * batch, stats


def test_continuation_follows_the_rows_state():
    draft = [(10, 60), (10, 64), (20, 50), (30, 70)]
    g = OnsetGrammar(1, 100)
    assert continuation(draft, g, 0, 99) == [V.time_token(10), V.pitch_token(60),
                                             V.time_token(10), V.pitch_token(64),
                                             V.time_token(20), V.pitch_token(50),
                                             V.time_token(30), V.pitch_token(70), V.EOS]
    assert continuation(draft, g, 0, 3) == [V.time_token(10), V.pitch_token(60),
                                            V.time_token(10)]
    g.update(np.array([V.time_token(10)]))
    g.update(np.array([V.pitch_token(60)]))
    assert continuation(draft, g, 0, 2) == [V.time_token(10), V.pitch_token(64)]
    g.update(np.array([V.time_token(10)]))  # a time is pending: its pitch first
    assert continuation(draft, g, 0, 2) == [V.pitch_token(64), V.time_token(20)]
    g.update(np.array([V.pitch_token(62)]))  # the LM chose another note at 10
    assert continuation(draft, g, 0, 2) == [V.time_token(10), V.pitch_token(64)]
    g.update(np.array([V.time_token(25)]))  # no draft note at 25
    assert continuation(draft, g, 0, 4) == []


def test_continuation_takes_the_nearest_draft_note_after_a_moved_time():
    draft = [(10, 60), (21, 50), (30, 70)]
    g = OnsetGrammar(1, 100)
    for token in (V.time_token(10), V.pitch_token(60), V.time_token(20)):  # the LM said 20
        g.update(np.array([token]))
    assert continuation(draft, g, 0, 3) == [V.pitch_token(50), V.time_token(30),
                                            V.pitch_token(70)]
    g.update(np.array([V.pitch_token(50)]))
    g.update(np.array([V.time_token(26)]))  # 4 ticks from the next draft note: no draft
    assert continuation(draft, g, 0, 3) == []


def _guesses(kind: str, truth: dict, rng: np.random.Generator, fallback):
    """A guess function: the greedy result (exact), random tokens (wrong), or each guess right
    with probability 1/2 (mixed)."""
    def guess(*key):
        right = truth.get(key[:2], fallback(rng, *key))
        if kind == "exact" or (kind == "mixed" and rng.random() < 0.5):
            return right
        return fallback(rng, *key)
    return guess


def _random_velocity(rng, tick, pitch):
    return V.velocity_token(int(rng.integers(1, 128)))


def _random_offset(rng, on, pitch, limit):
    hi = limit if limit >= 0 else V.SEGMENT_TICKS + 1
    if limit < 0 and rng.random() < 0.3:
        return V.NOTE_SUSTAIN
    return V.time_token(int(rng.integers(on + 1, hi + (limit >= 0))))


def _rows_and_notes(batch: int, rng: np.random.Generator):
    """Rows in a chain (carried notes pass from row to row in the offset stage), the last with
    notes carried in from outside, and each row's known notes."""
    rows = [RowSpec(i, i - 1 if i else None) for i in range(batch - 1)]
    rows.append(RowSpec(7, None, [OpenNote(-6, 45), OpenNote(-6, 72), OpenNote(-5, 60)]))
    notes = []
    for r in range(batch):
        picked = {(int(t), int(p)) for t, p in zip(rng.integers(0, 1000, 9),
                                                    rng.integers(40, 80, 9))}
        notes.append(sorted(picked | {(100 + 50 * r, 60)}))  # one key struck twice or more
    return rows, notes


@pytest.mark.parametrize("model", ["hier", "aligned"])
@pytest.mark.parametrize("kind", ["ort", "torch"])
@pytest.mark.parametrize("batch", [1, 8])
def test_parallel_velocities_and_offsets_equal_greedy(exported, aligned,  # noqa: F811
                                                      model, kind, batch):
    system, folder = _models(exported, aligned)[model]
    backend = _backends(system, folder)[kind]
    emb = _embeddings(backend, batch, seed=30 + batch)
    rng = np.random.default_rng(batch)
    rows, notes = _rows_and_notes(batch, rng)
    velocities = decode_velocities(backend, emb, notes)
    offsets, carry = decode_offsets(backend, emb, rows, notes)
    for guess in ("exact", "wrong", "mixed"):
        drafts = []
        for n, vel, off in zip(notes, velocities, offsets):
            drafts.append(GuessDraft(
                n, _guesses(guess, dict(zip(n, vel)), rng, _random_velocity),
                _guesses(guess, offsets_by_note(off), rng, _random_offset)))
        v_stats, o_stats = SpeculativeStats(), SpeculativeStats()
        assert decode_velocities(backend, emb, notes, drafts, v_stats) == velocities, guess
        assert decode_offsets(backend, emb, rows, notes, drafts, o_stats) == (offsets, carry), \
            guess
        assert v_stats.tokens == sum(map(len, velocities))
        if guess == "exact":  # several notes a call
            assert v_stats.acceptance == 1.0 and v_stats.tokens_per_call > 2, v_stats
            assert o_stats.acceptance == 1.0 and o_stats.tokens_per_call > 2, o_stats


def _flat_draft(kind: str, greedy: list[int], rng: np.random.Generator) -> GuessDraft:
    """The flattened baseline's greedy result as a draft (exact), each guess right with
    probability 1/2 (mixed), every note a tick late with random guesses (wrong), the LM's
    notes and more (longer), or nothing (empty)."""
    groups = [greedy[i:i + 4] for i in range(0, len(greedy) - 1, 4)]
    own = [(V.token_time(on), V.token_pitch(p)) for on, p, _, _ in groups
           if on != V.NOTE_SUSTAIN]
    key = {(0 if on == V.NOTE_SUSTAIN else V.token_time(on), V.token_pitch(p)): (off, vel)
           for on, p, off, vel in groups}
    if kind == "empty":
        return GuessDraft()
    if kind == "wrong":
        return GuessDraft(sorted({(min(t + 1, 999), p) for t, p in own}),
                          lambda t, p: _random_velocity(rng, t, p),
                          lambda on, p, lim: _random_offset(rng, on, p, lim))
    own = sorted(set(own))  # a Draft's notes are sorted (random weights may repeat a note)
    onsets = own + [(990 + i, 60 + i) for i in range(3)] if kind == "longer" else own
    return GuessDraft(
        onsets,
        _guesses("mixed" if kind == "mixed" else "exact",
                 {n: vel for n, (_, vel) in key.items()}, rng, _random_velocity),
        _guesses("mixed" if kind == "mixed" else "exact",
                 {n: off for n, (off, _) in key.items()}, rng, _random_offset))


@pytest.mark.parametrize("kind", ["ort", "torch"])
@pytest.mark.parametrize("batch", [1, 8])
def test_speculative_flat_baseline_equals_greedy(exported, kind, batch):
    """The flattened baseline verifies drafts of whole notes (`on pitch off velocity`, own
    then carried): the same tokens as greedy decoding, whatever the draft."""
    backend = _backends(exported.flat, exported.dirs["flat"])[kind]
    emb = _embeddings(backend, batch, seed=50 + batch)
    rows = [RowSpec(i, None, [OpenNote(-1, 45), OpenNote(-1, 72)] if i % 2 else [])
            for i in range(batch)]
    greedy = [s.tokens["flat"] for s in decode_flat(backend, emb, rows, 10)]
    assert any(len(t) >= 9 for t in greedy)  # notes to draft, not only eos
    rng = np.random.default_rng(batch)
    for draft_kind in ("exact", "longer", "wrong", "mixed", "empty"):
        stats = SpeculativeStats()
        drafts = [_flat_draft(draft_kind, t, rng) for t in greedy]
        got = [s.tokens["flat"] for s in decode_flat(backend, emb, rows, 10, stats, drafts)]
        assert got == greedy, draft_kind
        assert stats.tokens == sum(map(len, greedy))
        if draft_kind == "exact":
            assert stats.tokens_per_call > 2, stats


def test_flat_continuation_follows_the_rows_notes():
    draft = FlatDraft.from_draft(
        GuessDraft([(10, 60), (20, 50)], lambda t, p: V.velocity_token(p),
                   lambda on, p, lim: V.time_token(on + 7)), carried=[45])
    g1 = [V.time_token(10), V.pitch_token(60), V.time_token(17), V.velocity_token(60)]
    g2 = [V.time_token(20), V.pitch_token(50), V.time_token(27), V.velocity_token(50)]
    g3 = [V.NOTE_SUSTAIN, V.pitch_token(45), V.time_token(7), V.velocity_token(45)]
    assert draft.continuation([], 99) == g1 + g2 + g3 + [V.EOS]
    assert draft.continuation(g1, 5) == g2 + g3[:1]
    assert draft.continuation(g1 + [V.time_token(21)], 3) == g2[1:]  # the nearest note at 21
    assert draft.continuation(g1 + [V.time_token(40)], 3) == []  # no draft note near 40
    assert draft.continuation(g1 + g2 + [V.NOTE_SUSTAIN, V.pitch_token(45)], 9) == \
        g3[2:] + [V.EOS]
    assert draft.continuation(g1 + g2 + g3, 9) == [V.EOS]


def test_padding_leaves_both_grammars_where_they_are():
    """A verify call gives rows that kept nothing more PAD: no grammar may move on."""
    from pianolm.runtime.grammar import FlatGrammar

    for grammar in (OnsetGrammar(2, 10), FlatGrammar(2, 10)):
        grammar.update(np.array([V.time_token(10), V.time_token(10)]))
        before = grammar.mask()
        grammar.update(np.array([V.PAD, V.pitch_token(60)]))
        after = grammar.mask()
        assert (after[0] == before[0]).all() and not (after[1] == before[1]).all()
