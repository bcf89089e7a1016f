"""The token codec (runtime/tokens.py) against its spec, docs/tokens.md."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pianolm.runtime.notes import Note
from pianolm.runtime.tokens import (
    SegmentNotes,
    SegmentResult,
    TickNote,
    carried_into,
    decode,
    decode_flat,
    decode_offset,
    decode_onset,
    decode_velocity,
    encode,
    encode_flat,
    encode_offset,
    encode_onset,
    encode_velocity,
    quantize,
    segment_notes,
    stitch,
    to_notes,
)
from pianolm.runtime.vocab import (
    EOS,
    NOTE_SUSTAIN,
    PAD,
    SOS,
    TASK_FLAT,
    TASK_OFFSET,
    TASK_ONSET,
    TASK_VELOCITY,
    VOCAB_SIZE,
    pitch_token,
    time_token,
    velocity_token,
)

T, P, V, S = time_token, pitch_token, velocity_token, NOTE_SUSTAIN
STAGES = ("onset", "velocity", "offset", "flat")


# ---------------------------------------------------------------------------------------------
# helpers


def roundtrip(notes: list[TickNote], n_segments: int | None = None) -> list[Note]:
    """segment -> encode (3 stages) -> decode -> combine -> stitch."""
    results: list[SegmentResult] = []
    for seg in segment_notes(notes, n_segments):
        # what the runtime feeds as the carried block, from the segments before
        assert carried_into(results) == [n.pitch for n in seg.carried]
        onsets = decode_onset(encode_onset(seg))
        velocities = decode_velocity(encode_velocity(seg))
        offsets = decode_offset(encode_offset(seg))
        results.append(SegmentResult.from_stages(onsets, velocities, offsets))
    return stitch(results)


def roundtrip_flat(notes: list[TickNote], n_segments: int | None = None) -> list[Note]:
    segs = segment_notes(notes, n_segments)
    return stitch([SegmentResult.from_flat(decode_flat(encode_flat(seg))) for seg in segs])


def canonical(notes: list[Note]) -> list[Note]:
    return sorted(notes, key=lambda n: (n.onset, n.pitch, n.offset, n.velocity))


def assert_valid_notes(notes: list[Note]) -> None:
    for n in notes:
        assert math.isfinite(n.onset) and math.isfinite(n.offset)
        assert 0 <= n.onset < n.offset
        assert 21 <= n.pitch <= 108 and 0 <= n.velocity <= 127


# Three notes over two segments (ticks): B own in 0; A own in 0, sustains, carried into 1;
# C own in 1.
A = TickNote(950, 1230, 60, 80)
B = TickNote(100, 400, 64, 100)
C = TickNote(1100, 1150, 67, 50)


# ---------------------------------------------------------------------------------------------
# strategies


@st.composite
def tick_notes(draw: st.DrawFn, max_pitches: int = 8) -> list[TickNote]:
    """Non-overlapping notes per pitch; durations 1 tick to 3.5 segments; times often snapped
    to segment boundaries (k*1000 - 1, k*1000, k*1000 + 1; never earlier)."""

    def snap(t: int) -> int:
        choice = draw(st.integers(0, 5))
        boundary = -(-t // 1000) * 1000
        return t if choice > 2 else max(boundary + choice - 1, t)

    notes = []
    for pitch in draw(st.lists(st.integers(21, 108), max_size=max_pitches, unique=True)):
        t = snap(draw(st.integers(0, 2500)))
        for _ in range(draw(st.integers(1, 4))):
            duration = draw(st.one_of(st.integers(1, 30), st.integers(1, 3500)))
            end = max(snap(t + duration), t + 1)
            notes.append(TickNote(t, end, pitch, draw(st.integers(0, 127))))
            t = snap(end + draw(st.one_of(st.just(0), st.integers(0, 1500))))
    return notes


@st.composite
def overlapping_notes(draw: st.DrawFn) -> list[TickNote]:
    """Any notes, same-pitch overlaps and duplicates included (few pitches, many collisions)."""
    out = []
    for _ in range(draw(st.integers(0, 12))):
        onset = draw(st.sampled_from([0, 10, 999, 1000, 1500, 2000]) | st.integers(0, 3000))
        duration = draw(st.sampled_from([1, 500, 1000, 1001]) | st.integers(1, 3000))
        pitch = draw(st.sampled_from([21, 60, 61, 108]))
        out.append(TickNote(onset, onset + duration, pitch, draw(st.integers(0, 127))))
    return out


any_token = st.one_of(
    st.integers(-3, VOCAB_SIZE + 3),
    st.sampled_from([PAD, SOS, EOS, TASK_ONSET, TASK_VELOCITY, TASK_OFFSET, TASK_FLAT, S]),
    st.sampled_from([T(0), T(1), T(999), T(1000), P(21), P(108), V(0), V(127)]),
    st.integers(-(2**70), 2**70),
)


@st.composite
def mutated(draw: st.DrawFn, tokens: list[int]) -> list[int]:
    """Random deletions, insertions, replacements and swaps of a token list."""
    tokens = list(tokens)
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["delete", "insert", "replace", "swap"]))
        i = draw(st.integers(0, max(len(tokens) - 1, 0)))
        if op == "insert":
            tokens.insert(i, draw(any_token))
        elif tokens and op == "delete":
            del tokens[i]
        elif tokens and op == "replace":
            tokens[i] = draw(any_token)
        elif tokens:
            j = draw(st.integers(0, len(tokens) - 1))
            tokens[i], tokens[j] = tokens[j], tokens[i]
    return tokens


# ---------------------------------------------------------------------------------------------
# round trip


@settings(max_examples=100, deadline=None)
@given(tick_notes(), st.integers(0, 2))
def test_roundtrip_hierarchical(notes: list[TickNote], extra_segments: int) -> None:
    expected = canonical(to_notes(notes))
    assert roundtrip(notes) == expected
    n = len(segment_notes(notes)) + extra_segments  # trailing empty segments change nothing
    assert roundtrip(notes, n) == expected


@settings(max_examples=60, deadline=None)
@given(tick_notes())
def test_roundtrip_flat(notes: list[TickNote]) -> None:
    assert roundtrip_flat(notes) == canonical(to_notes(notes))


@settings(max_examples=100, deadline=None)
@given(overlapping_notes())
def test_roundtrip_with_same_pitch_overlaps(notes: list[TickNote]) -> None:
    expected = canonical(to_notes(notes))
    assert roundtrip(notes) == expected
    assert roundtrip_flat(notes) == expected


@settings(max_examples=60, deadline=None)
@given(tick_notes())
def test_decoders_return_the_encoded_structures(notes: list[TickNote]) -> None:
    for seg in segment_notes(notes):
        own = [(n.onset_tick - seg.start, n.pitch) for n in seg.own]
        assert decode("onset", encode_onset(seg)) == own
        assert decode("velocity", encode_velocity(seg)) == [
            (t, p, n.velocity) for (t, p), n in zip(own, seg.own, strict=True)]

        def off(n: TickNote, start: int = seg.start) -> int | None:
            rel = n.offset_tick - start
            return rel if rel <= 1000 else None

        own_off = [(t, p, off(n)) for (t, p), n in zip(own, seg.own, strict=True)]
        carried = [(n.pitch, off(n)) for n in seg.carried]
        assert decode("offset", encode_offset(seg)) == (own_off, carried)
        assert decode("flat", encode_flat(seg)) == (
            [(t, p, o, n.velocity) for (t, p, o), n in zip(own_off, seg.own, strict=True)],
            [(p, o, n.velocity) for (p, o), n in zip(carried, seg.carried, strict=True)])
        for stage in STAGES:
            tokens, predicted = encode(stage, seg)
            assert len(tokens) == len(predicted)
            assert all(0 <= t < VOCAB_SIZE for t in tokens)


@settings(max_examples=40, deadline=None)
@given(tick_notes(), st.data())
def test_skipped_tokens_are_transparent(notes: list[TickNote], data: st.DataObject) -> None:
    filler = st.sampled_from([PAD, SOS, TASK_ONSET, TASK_VELOCITY, TASK_OFFSET, TASK_FLAT])
    for seg in segment_notes(notes):
        for stage in STAGES:
            tokens, _ = encode(stage, seg)
            noisy = list(tokens)
            for _ in range(data.draw(st.integers(0, 5))):
                noisy.insert(data.draw(st.integers(0, len(noisy))), data.draw(filler))
            assert decode(stage, noisy) == decode(stage, tokens)


def test_carries_across_several_segments() -> None:
    long = TickNote(500, 3200, 40, 90)  # sounds through segments 0..3
    segs = segment_notes([long])
    assert len(segs) == 4
    assert [s.carried for s in segs] == [[], [long], [long], [long]]
    assert [encode_offset(s)[-1] for s in segs] == [S, S, S, T(200)]
    assert roundtrip([long]) == to_notes([long])


# ---------------------------------------------------------------------------------------------
# malformed input


@settings(max_examples=200, deadline=None)
@given(st.lists(any_token, max_size=80))
def test_decoders_never_raise_on_random_tokens(tokens: list[int]) -> None:
    for stage in STAGES:
        decode(stage, tokens)
    own, carried = decode_offset(tokens)
    for tick, pitch, off in own:
        assert 0 <= tick < 1000 and 21 <= pitch <= 108 and (off is None or tick < off <= 1000)
    for pitch, off in carried:
        assert 21 <= pitch <= 108 and (off is None or 1 <= off <= 1000)
    for tick, pitch, velocity in decode_velocity(tokens):
        assert 0 <= tick < 1000 and 21 <= pitch <= 108 and 0 <= velocity <= 127


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(*[st.lists(any_token, max_size=40)] * 4), max_size=4))
def test_stitch_never_raises_on_random_decodings(segments: list[tuple[list[int], ...]]) -> None:
    hier = [SegmentResult.from_stages(decode_onset(a), decode_velocity(b), decode_offset(c))
            for a, b, c, _ in segments]
    assert_valid_notes(stitch(hier))
    assert_valid_notes(stitch([SegmentResult.from_flat(decode_flat(d)) for *_, d in segments]))


@settings(max_examples=50, deadline=None)
@given(tick_notes(max_pitches=3), st.data())
def test_mutated_sequences_decode_and_stitch(notes: list[TickNote], data: st.DataObject) -> None:
    hier, flat = [], []
    for seg in segment_notes(notes):
        mutate = {stage: data.draw(mutated(encode(stage, seg)[0])) for stage in STAGES}
        hier.append(SegmentResult.from_stages(decode_onset(mutate["onset"]),
                                              decode_velocity(mutate["velocity"]),
                                              decode_offset(mutate["offset"])))
        flat.append(SegmentResult.from_flat(decode_flat(mutate["flat"])))
    assert_valid_notes(stitch(hier))
    assert_valid_notes(stitch(flat, end=0.0))


def test_decoders_accept_odd_inputs() -> None:
    assert decode_onset([]) == []
    assert decode_onset([float("nan"), float("inf"), T(1), P(60)]) == [(1, 60)]
    assert decode_onset(iter([T(1), P(60)])) == [(1, 60)]
    with pytest.raises(ValueError):
        decode("chords", [])


# ---------------------------------------------------------------------------------------------
# exact sequences


def test_exact_sequences_and_masks() -> None:
    seg0, seg1 = segment_notes([A, B, C])
    assert (seg0.own, seg0.carried, seg1.own, seg1.carried) == ([B, A], [], [C], [A])

    onset, mask = encode("onset", seg0)
    assert onset == [SOS, TASK_ONSET, T(100), P(64), T(950), P(60), EOS]
    assert onset == [1, 3, 108, 1052, 958, 1048, 2]  # the ids themselves (runtime/vocab.py)
    assert mask == [False, False, True, True, True, True, True]

    velocity, mask = encode("velocity", seg0)
    assert velocity == [SOS, TASK_VELOCITY, T(100), P(64), V(100), T(950), P(60), V(80)]
    assert mask == [False, False, False, False, True, False, False, True]

    offset, mask = encode("offset", seg0)
    assert offset == [SOS, TASK_OFFSET, T(100), P(64), T(400), T(950), P(60), S]
    assert mask == [False, False, False, False, True, False, False, True]

    flat, mask = encode("flat", seg0)
    assert flat == [SOS, TASK_FLAT, T(100), P(64), T(400), V(100), T(950), P(60), S, V(80), EOS]
    assert mask == [False, False] + [True] * 9

    assert encode_onset(seg1) == [SOS, TASK_ONSET, T(100), P(67), EOS]
    assert encode_velocity(seg1) == [SOS, TASK_VELOCITY, T(100), P(67), V(50)]
    assert encode_offset(seg1) == [SOS, TASK_OFFSET, T(100), P(67), T(150), S, P(60), T(230)]
    assert encode("offset", seg1)[1] == [False, False, False, False, True, False, False, True]
    assert encode_flat(seg1) == [SOS, TASK_FLAT, T(100), P(67), T(150), V(50),
                                 S, P(60), T(230), V(80), EOS]

    assert decode_offset(encode_offset(seg1)) == ([(100, 67, 150)], [(60, 230)])
    assert roundtrip([A, B, C]) == roundtrip_flat([A, B, C]) == canonical(to_notes([A, B, C]))


def test_empty_segments() -> None:
    assert segment_notes([]) == []
    (seg,) = segment_notes([], n_segments=1)
    for stage, task in zip(STAGES, [TASK_ONSET, TASK_VELOCITY, TASK_OFFSET, TASK_FLAT],
                           strict=True):
        tokens, mask = encode(stage, seg)
        eos = [EOS] if stage in ("onset", "flat") else []
        assert tokens == [SOS, task, *eos]
        assert mask == [False, False] + [True] * len(eos)


def test_carried_order_and_boundaries() -> None:
    x = TickNote(10, 2500, 70)  # owned by 0
    y = TickNote(1500, 2600, 50)  # owned by 1
    z = TickNote(1999, 2000, 40)  # owned by 1, ends exactly at segment 1's end: not carried
    w = TickNote(1200, 2001, 40)  # owned by 1, carried by one tick
    u = TickNote(2000, 2001, 80)  # owned by 2: onset exactly at its start
    segs = segment_notes([x, y, z, w, u])
    assert segs[2].own == [u]
    assert segs[2].carried == [w, y, x]  # owning segment descending, then pitch
    assert encode_offset(segs[1])[-6:] == [T(999), P(40), T(1000), S, P(70), S]
    assert encode_offset(segs[2]) == [SOS, TASK_OFFSET, T(0), P(80), T(1), S, P(40), T(1),
                                      S, P(50), T(600), S, P(70), T(500)]
    assert roundtrip([x, y, z, w, u]) == canonical(to_notes([x, y, z, w, u]))


def test_segment_count_and_truncation() -> None:
    assert len(segment_notes([TickNote(0, 1000, 60)])) == 1
    assert len(segment_notes([TickNote(0, 1001, 60)])) == 2
    long = TickNote(500, 2500, 60)
    late = TickNote(1500, 1600, 62)
    segs = segment_notes([long, late], n_segments=1)
    assert len(segs) == 1 and segs[0].own == [long]
    assert encode_offset(segs[0])[-1] == S
    results = [SegmentResult.from_stages(decode_onset(encode_onset(segs[0])),
                                         decode_velocity(encode_velocity(segs[0])),
                                         decode_offset(encode_offset(segs[0])))]
    assert stitch(results) == [Note(5.0, 10.0, 60, 64)]  # still open: ends with the audio
    assert stitch(results, end=7.25) == [Note(5.0, 7.25, 60, 64)]
    with pytest.raises(ValueError):
        segment_notes([long], n_segments=-1)


def test_encoders_reject_foreign_notes() -> None:
    with pytest.raises(ValueError):
        encode_onset(SegmentNotes(1, own=[B]))
    with pytest.raises(ValueError):
        encode_offset(SegmentNotes(2, carried=[A]))  # A ends in segment 1
    with pytest.raises(ValueError):
        encode("chords", SegmentNotes(0))
    for bad in [(5, 5, 60, 64), (-1, 5, 60, 64), (0, 5, 20, 64), (0, 5, 60, 128)]:
        with pytest.raises(ValueError):
            TickNote(*bad)


# ---------------------------------------------------------------------------------------------
# the malformed-sequence rule, case by case


@pytest.mark.parametrize("tokens, expected", [
    ([T(1), T(2), P(60)], [(2, 60)]),  # a time starts a new group
    ([T(1), V(3), P(60)], []),  # a velocity breaks the group, is dropped; pitch cannot start
    ([T(1), PAD, P(60)], [(1, 60)]),  # pad is skipped
    ([P(60), T(1), P(61), P(62)], [(1, 61)]),
    ([T(1), P(60), EOS, T(2), P(61)], [(1, 60)]),  # eos ends the sequence
    ([-5, 10**9, VOCAB_SIZE, T(1), P(60)], [(1, 60)]),  # out of range: dropped
    ([T(1000), P(60), T(999), P(61)], [(999, 61)]),  # onset at time 1000: impossible
    ([S, P(60)], []),  # note_sustain is no onset
])
def test_onset_rule(tokens: list[int], expected: list[tuple[int, int]]) -> None:
    assert decode_onset(tokens) == expected


def test_velocity_rule() -> None:
    assert decode_velocity([T(1), P(60), V(90), V(91), T(2), P(61), T(3), P(62), V(7)]) == [
        (1, 60, 90), (3, 62, 7)]


def test_offset_rule() -> None:
    assert decode_offset([T(10), P(60), T(10), T(10), P(61), T(11)]) == ([(10, 61, 11)], [])
    assert decode_offset([S, P(60), T(0), S, P(61), T(1), S, P(62), S]) == (
        [], [(61, 1), (62, None)])
    assert decode_offset([T(5), P(60), S, P(61), T(9)]) == ([(5, 60, None)], [])
    assert decode_offset([T(5), P(60), P(61), S, P(61), T(1000)]) == ([], [(61, 1000)])
    assert decode_offset([T(5), P(60), T(6), EOS, S, P(61), T(3)]) == ([(5, 60, 6)], [])


def test_flat_rule() -> None:
    assert decode_flat([T(5), P(60), T(6), V(7), S, P(61), S, V(8), T(1), P(2)]) == (
        [(5, 60, 6, 7)], [(61, None, 8)])
    assert decode_flat([T(5), P(60), T(6), T(5), P(60), T(7), V(1)]) == ([(5, 60, 7, 1)], [])


# ---------------------------------------------------------------------------------------------
# stitch


def test_stitch_matches_carried_by_pitch_and_closes_missing() -> None:
    segs = [SegmentResult(own=[(900, 60, 70, None), (950, 62, 71, None), (990, 64, 72, None)]),
            SegmentResult(own=[(5, 65, 73, 10)], carried=[(64, None), (62, 20), (99, 30)]),
            SegmentResult(carried=[(64, 1)])]
    assert carried_into(segs[:1]) == [60, 62, 64]
    assert carried_into(segs[:2]) == [64]
    assert carried_into(segs) == carried_into([]) == []
    assert stitch(segs) == [
        Note(9.0, 10.0, 60, 70),  # not mentioned in segment 1: ends at its start
        Note(9.5, 10.2, 62, 71),
        Note(9.9, 20.01, 64, 72),  # carried through segment 1 into 2
        Note(10.05, 10.1, 65, 73),
    ]


def test_stitch_clamps_impossible_values() -> None:
    segs = [SegmentResult(own=[(10, 60, 64, 5)]),
            SegmentResult(own=[(10, 61, 64, None)])]
    assert stitch(segs, end=1.0) == [Note(0.1, 0.11, 60, 64), Note(10.1, 10.11, 61, 64)]


def test_from_stages_matches_by_position() -> None:
    result = SegmentResult.from_stages([(1, 60), (2, 61), (3, 62)], [(1, 60, 90)],
                                       ([(1, 60, 5), (2, 61, None)], [(70, 8)]))
    assert result == SegmentResult([(1, 60, 90, 5), (2, 61, 64, None), (3, 62, 64, None)],
                                   [(70, 8)])


# ---------------------------------------------------------------------------------------------
# quantize


def test_quantize_edge_cases() -> None:
    notes = [
        Note(1.0, 1.0, 60, 64),  # offset == onset -> onset + 1 tick
        Note(2.0, 2.004, 61, 64),  # offset rounds onto the onset tick
        Note(3.0, 2.5, 62, 64),  # offset before onset
        Note(-0.02, 0.5, 63, 64),  # negative onset -> tick 0
        Note(4.0, 5.0, 20, 64),  # below the piano: dropped
        Note(4.0, 5.0, 109, 64),  # above the piano: dropped
        Note(4.0, 5.0, 64, 200),  # velocity clamped
        Note(4.126, 5.994, 65, 0),
    ]
    assert quantize(notes) == [
        TickNote(0, 50, 63, 64),
        TickNote(100, 101, 60, 64),
        TickNote(200, 201, 61, 64),
        TickNote(300, 301, 62, 64),
        TickNote(400, 500, 64, 127),
        TickNote(413, 599, 65, 0),
    ]
    assert to_notes([TickNote(413, 599, 65, 0)]) == [Note(4.13, 5.99, 65, 0)]


@settings(max_examples=40, deadline=None)
@given(tick_notes())
def test_quantize_inverts_to_notes(notes: list[TickNote]) -> None:
    def key(n: TickNote) -> tuple[int, int, int, int]:
        return (n.onset_tick, n.pitch, n.offset_tick, n.velocity)

    assert quantize(to_notes(notes)) == sorted(notes, key=key)


# ---------------------------------------------------------------------------------------------


def test_codec_is_torch_free() -> None:
    code = "import sys, pianolm.runtime.tokens; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
