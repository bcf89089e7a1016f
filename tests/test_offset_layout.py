"""The authors' offset-stage layout (DecoderSpec.carried "separate", runtime/decode.py
decode_offsets_separate): a segment's carried notes are decoded in a sequence of their own.

With the fake backend (logits are a function of a row's own history), these check what each
sequence is fed, and that a segment's tokens do not depend on which segments share its batch.
"""

from __future__ import annotations

import numpy as np

from pianolm.runtime import vocab as V
from pianolm.runtime.decode import OpenNote, RowSpec, decode_offsets, decode_offsets_separate
from tests.fake_backend import FakeBackend


class Recording(FakeBackend):
    """Keeps every session it opens, to read the sequences fed to each row."""

    def __init__(self) -> None:
        super().__init__()
        self.sessions = []

    def start(self, stage, embeddings):
        self.sessions.append(super().start(stage, embeddings))
        return self.sessions[-1]


def _segments(n: int, seed: int = 0) -> tuple[np.ndarray, list[list[tuple[int, int]]]]:
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(n, 4, 1)).astype(np.float32)
    notes = [sorted({(int(t), int(p)) for t, p in zip(rng.integers(0, 1000, 6),
                                                     rng.integers(21, 109, 6))})
             for _ in range(n)]
    return embeddings, notes


def _one_at_a_time(embeddings, notes):
    """Each segment alone in its batch, its carried notes handed over between calls."""
    out, carry = [], []
    for k in range(len(notes)):
        (tokens,), (carry,) = decode_offsets_separate(
            FakeBackend(), embeddings[k:k + 1], [RowSpec(k, None, carry)], [notes[k]])
        out.append(tokens)
    return out


def test_a_segment_decodes_the_same_in_any_batch() -> None:
    embeddings, notes = _segments(5)
    chained = [RowSpec(k, k - 1 if k else None) for k in range(5)]
    together, _ = decode_offsets_separate(FakeBackend(), embeddings, chained, notes)
    assert together == _one_at_a_time(embeddings, notes)
    assert any(V.NOTE_SUSTAIN in t[::3] for t in together)  # notes were carried


def test_carried_notes_have_a_sequence_of_their_own() -> None:
    embeddings, notes = _segments(4, seed=1)
    backend = Recording()
    rows = [RowSpec(k, k - 1 if k else None) for k in range(4)]
    out, carry_out = decode_offsets_separate(backend, embeddings, rows, notes)
    (session,) = backend.sessions
    prompt = [V.SOS, V.TASK_TOKEN["offset"]]
    chained = 0  # notes carried on through a second boundary
    for k in range(4):
        own_fed, carried_fed = session.history[k][2:], session.history[4 + k][2:]
        # own: `time pitch off` per own note, in their order; nothing carried
        assert own_fed[:2] == prompt and own_fed[2::3] == [V.time_token(t) for t, _ in notes[k]]
        # carried: the previous segment's sustaining own notes in their order, then the notes
        # it carried on, each `note_sustain pitch off`
        assert carried_fed[:2] == prompt and set(carried_fed[2::3]) <= {V.NOTE_SUSTAIN}
        if k:
            own_sustaining = [p for (_, p), off in zip(notes[k - 1], out[k - 1][2::3])
                              if off == V.NOTE_SUSTAIN]
            previous = [o.pitch for o in carry_out[k - 1]]
            assert previous[:len(own_sustaining)] == own_sustaining
            chained += len(previous) - len(own_sustaining)
            struck_at_start = {p for t, p in notes[k] if t == 0}  # ends the carried note
            assert [V.token_pitch(t) for t in carried_fed[3::3]] == [
                p for p in previous if p not in struck_at_start]
        else:
            assert carried_fed == prompt
        # the tokens written: own, then the carried block in pianolm's order
        triples = [out[k][i:i + 3] for i in range(0, len(out[k]), 3)]
        carried = [(V.token_pitch(t[1])) for t in triples if t[0] == V.NOTE_SUSTAIN]
        assert sorted(carried) == sorted(V.token_pitch(t) for t in carried_fed[3::3])
    assert chained  # the case their script drops is exercised


def test_the_layouts_differ_where_notes_are_carried() -> None:
    """Same notes, same fake model: the carried notes' context differs, so do their offs."""
    embeddings, notes = _segments(3, seed=2)
    rows = [RowSpec(k, k - 1 if k else None) for k in range(3)]
    after, _ = decode_offsets(FakeBackend(), embeddings, rows, notes)
    separate, _ = decode_offsets_separate(FakeBackend(), embeddings, rows, notes)
    own = [3 * len(n) for n in notes]
    assert [a[:n] for a, n in zip(after, own)] == [s[:n] for s, n in zip(separate, own)]
    assert after != separate


def test_carry_in_order_is_kept() -> None:
    """A segment whose predecessor was in another batch feeds carry_in as given (the order
    the predecessor's carried row would have fed), not re-sorted."""
    embeddings, notes = _segments(1, seed=3)
    notes = [[(t, p) for t, p in notes[0] if t > 0]]
    carry_in = [OpenNote(0, 70), OpenNote(0, 40), OpenNote(-1, 50)]
    backend = Recording()
    decode_offsets_separate(backend, embeddings, [RowSpec(1, None, carry_in)], notes)
    fed = backend.sessions[0].history[1][2:]
    assert [V.token_pitch(t) for t in fed[3::3]] == [70, 40, 50]
