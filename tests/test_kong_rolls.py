"""runtime/kong_rolls.py: Kong et al.'s roll post-processing, compared with Kong's own code
(piano_transcription_inference 0.0.6, the peers extra) where that is installed, and its plain
behaviour everywhere."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pianolm.runtime.kong_rolls import (
    KONG_SEGMENT_SAMPLES,
    kong_kept_frames,
    kong_notes,
    kong_peaks,
    kong_pedals,
    kong_window_count,
    kong_windows,
)
from pianolm.runtime.rolls import RollDecodeConfig

FPS = 100
PEERS = "Kong's piano_transcription_inference needs the peers extra: pip install -e '.[peers]'"


def _kong():
    """Kong's package (imports torch and librosa), or a clean skip."""
    return pytest.importorskip("piano_transcription_inference", reason=PEERS)


def _kong_post(rolls: dict, pedal: dict | None = None) -> tuple[list, list]:
    """Kong's RegressionPostProcessor on our rolls -> (notes, pedals) as plain tuples:
    notes (pitch, onset, offset, velocity) sorted by (pitch, onset); pedals (down, up)."""
    _kong()
    from piano_transcription_inference.utilities import RegressionPostProcessor

    post = RegressionPostProcessor(frames_per_second=FPS, classes_num=88, onset_threshold=0.3,
                                   offset_threshold=0.3, frame_threshold=0.1,
                                   pedal_offset_threshold=0.2)
    t = rolls["onset"].shape[0]
    pedal = pedal or {k: np.zeros(t, np.float32)
                      for k in ("pedal_onset", "pedal_offset", "pedal_frame")}
    out = {
        "reg_onset_output": rolls["onset"].astype(np.float32),
        "reg_offset_output": rolls["offset"].astype(np.float32),
        "frame_output": rolls["frame"].astype(np.float32),
        "velocity_output": rolls["velocity"].astype(np.float32),
        "reg_pedal_onset_output": pedal["pedal_onset"].reshape(t, 1).astype(np.float32),
        "reg_pedal_offset_output": pedal["pedal_offset"].reshape(t, 1).astype(np.float32),
        "pedal_frame_output": pedal["pedal_frame"].reshape(t, 1).astype(np.float32),
    }
    with np.errstate(divide="ignore", invalid="ignore"):  # their plateau 0 / 0
        notes, pedals = post.output_dict_to_midi_events(out)
    notes = sorted(((e["midi_note"], float(e["onset_time"]), float(e["offset_time"]),
                     e["velocity"]) for e in notes), key=lambda n: (n[0], n[1]))
    return notes, [(float(p["onset_time"]), float(p["offset_time"])) for p in pedals or []]


def _ours(notes) -> list[tuple[int, float, float, int]]:
    return sorted(((n.pitch, n.onset, n.offset, n.velocity) for n in notes),
                  key=lambda n: (n[0], n[1]))


def _assert_same_notes(ours, kong) -> None:
    """Same notes; where Kong ends a note before its onset we clamp the offset to the onset."""
    assert len(ours) == len(kong), (len(ours), len(kong))
    for o, k in zip(ours, kong):
        assert o[0] == k[0] and o[3] == k[3], (o, k)
        assert abs(o[1] - k[1]) < 1e-4, (o, k)
        assert abs(o[2] - max(k[2], k[1])) < 1e-4, (o, k)


def _assert_same_pedals(ours, kong) -> None:
    assert len(ours) == len(kong), (ours, kong)
    for o, k in zip(ours, kong):
        assert abs(o[0] - k[0]) < 1e-4 and abs(o[1] - k[1]) < 1e-4, (o, k)


# ---- roll builders ----


def _triangle(t: int, centre: float, half_width: float, height: float) -> np.ndarray:
    n = np.arange(t, dtype=np.float64)
    return (height * np.clip(1 - np.abs(n - centre) / half_width, 0, None)).astype(np.float32)


def _empty(t: int) -> dict[str, np.ndarray]:
    return {k: np.zeros((t, 88), np.float32) for k in ("onset", "offset", "frame", "velocity")}


def _note(rolls: dict, key: int, on: float, off: float | None, *, vel: float = 0.5,
          offset_peak: float | None = None, gone: int | None = None) -> None:
    """Add a note to `rolls`: an onset triangle at `on` (frames), the frame roll on until
    `gone` (default: the offset; None and no offset: to the end), an offset triangle."""
    t = rolls["onset"].shape[0]
    rolls["onset"][:, key] += _triangle(t, on, 4, 0.9)
    i = int(math.floor(on))
    end = gone if gone is not None else (t if off is None else int(math.ceil(off)))
    rolls["frame"][i:end, key] = 0.8
    rolls["velocity"][i - 3:i + 4, key] = vel
    if offset_peak is not None:
        rolls["offset"][:, key] += _triangle(t, offset_peak, 6, 0.8)


def _random_rolls(rng: np.random.Generator, t: int) -> tuple[dict, dict]:
    """Smooth roll-like outputs: sums of random triangles per key (no plateaus above the
    thresholds), notes of all lengths (some stuck past 6 s), re-strikes, offset peaks that come
    early, late or never, frame rolls that drop out, spurious bumps; and pedal presses."""
    rolls = {k: rng.uniform(0, 0.02, (t, 88)).astype(np.float32)
             for k in ("onset", "offset", "frame", "velocity")}
    for key in range(88):
        pos = float(rng.uniform(0, 50))
        while pos < t - 10:
            dur = float(rng.choice([rng.uniform(3, 60), rng.uniform(60, 300),
                                    rng.uniform(550, 900)], p=[0.6, 0.3, 0.1]))
            on, off = pos, min(pos + dur, t - 1.0)
            rolls["onset"][:, key] += _triangle(t, on, rng.uniform(2, 6), rng.uniform(0.2, 1))
            a, b = int(on), int(off)
            level = rng.uniform(0.2, 0.9) + rng.uniform(-0.05, 0.05, b - a)
            if rng.random() < 0.3:  # the frame roll drops out mid-note for a frame or two
                d = int(rng.integers(a, b))
                level[d - a:d - a + int(rng.integers(1, 3))] = rng.uniform(0, 0.1)
            rolls["frame"][a:b, key] += level.astype(np.float32)
            rolls["velocity"][max(a - 4, 0):a + 5, key] = rng.uniform(0, 0.99)
            r = rng.random()
            if r < 0.6:  # an offset peak near the frame's end
                rolls["offset"][:, key] += _triangle(t, off + rng.uniform(-8, 3),
                                                     rng.uniform(3, 10), rng.uniform(0.2, 1))
            elif r < 0.8:  # a stray one mid-note
                rolls["offset"][:, key] += _triangle(t, rng.uniform(on, off + 1),
                                                     rng.uniform(3, 10), rng.uniform(0.2, 1))
            if rng.random() < 0.3:  # a spurious onset bump
                rolls["onset"][:, key] += _triangle(t, rng.uniform(0, t), rng.uniform(1, 5),
                                                    rng.uniform(0.1, 0.6))
            # the next note: often after a gap, sometimes a re-strike while this one sounds
            pos = on + (rng.uniform(1, dur) if rng.random() < 0.25 else dur + rng.uniform(1, 80))
    np.clip(rolls["frame"], 0, 1, out=rolls["frame"])
    pedal = {k: rng.uniform(0, 0.02, t).astype(np.float32)
             for k in ("pedal_onset", "pedal_offset", "pedal_frame")}
    pos = float(rng.uniform(0, 40))
    while pos < t - 20:
        dur = rng.uniform(5, 200)
        a, b = int(pos), int(min(pos + dur, t - 1))
        ramp = np.linspace(0.3, 1.0, b - a, dtype=np.float32)  # rising: more than one onset
        pedal["pedal_frame"][a:b] += ramp * rng.uniform(0.6, 1.0)
        if rng.random() < 0.6:
            pedal["pedal_offset"] += _triangle(t, b + rng.uniform(-5, 15), rng.uniform(3, 8),
                                               rng.uniform(0.15, 1))
        pos = b + rng.uniform(2, 60)
    return rolls, pedal


# ---- against Kong's code ----


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_rolls_match_kong(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rolls, pedal = _random_rolls(rng, 3000)
    kong, kong_ped = _kong_post(rolls, pedal)
    assert all(np.isfinite([n[1] for n in kong] + [n[2] for n in kong]))  # plateau-free
    assert len(kong) > 200 and len(kong_ped) > 5
    assert any(n[2] - n[1] > 5.99 for n in kong), "no stuck note reached the 6 s cap"
    _assert_same_notes(_ours(kong_notes(rolls, FPS)), kong)
    _assert_same_pedals(kong_pedals(pedal, FPS), kong_ped)


def test_peaks_match_kong() -> None:
    _kong()
    from piano_transcription_inference.utilities import RegressionPostProcessor

    rng = np.random.default_rng(5)
    rolls, _ = _random_rolls(rng, 1500)
    # rounding makes ties (plateaus), where the monotonic test's `not <` matters
    x = np.round(rolls["onset"], 2)
    for neighbour in (2, 4):
        with np.errstate(divide="ignore", invalid="ignore"):  # their plateau 0 / 0
            mask, shift = RegressionPostProcessor(FPS, 88, 0.3, 0.3, 0.1, 0.2) \
                .get_binarized_output_from_regression(x, 0.3, neighbour)
        ours = kong_peaks(x, 0.3, neighbour)
        np.testing.assert_array_equal(ours.mask, mask == 1)
        finite = np.isfinite(shift)
        np.testing.assert_array_equal(ours.shift[finite], shift[finite])
        assert np.all(ours.shift[~finite] == 0)


def _case_rolls() -> tuple[dict, dict]:
    """Hand-built notes, one rule each, on separate keys; and two pedal presses."""
    t = 1200
    r = _empty(t)
    _note(r, 0, 100.3, 150, offset_peak=149.6)  # clean: offset peak late -> taken
    _note(r, 1, 100.0, None, gone=140, offset_peak=110.2)  # offset peak early -> frame's end
    _note(r, 2, 200.4, None)  # stuck: capped at 600 frames
    _note(r, 3, 1000.2, None)  # stuck until the last frame
    _note(r, 4, 300.6, 400)  # re-strike at 330: the first note ends at frame 329
    r["onset"][:, 4] += _triangle(t, 330.2, 4, 0.9)
    _note(r, 5, 500.3, 560, offset_peak=600.0)  # offset peak after the frame's end: not used
    _note(r, 6, 700.7, 720, vel=0.999)  # velocity 127
    pedal = {k: np.zeros(t, np.float32) for k in ("pedal_onset", "pedal_offset", "pedal_frame")}
    # up at its offset peak; then down again (still rising) until it falls at 150
    pedal["pedal_frame"][50:150] = np.linspace(0.6, 0.9, 100)
    pedal["pedal_offset"] += _triangle(t, 140.3, 5, 0.7)
    pedal["pedal_frame"][300:400] = 0.9  # no offset peak: up where it fell, 10 frames on
    pedal["pedal_frame"][1195:] = 0.9  # still down at the end: dropped, as Kong drops it
    return r, pedal


def test_hand_built_cases() -> None:
    rolls, pedal = _case_rolls()
    notes = {n.pitch - 21: n for n in kong_notes(rolls, FPS)}
    assert len(kong_notes(rolls, FPS)) == 8
    assert notes[0].onset == pytest.approx(1.003, abs=1e-6)
    assert notes[0].offset == pytest.approx(1.496, abs=1e-6)
    assert notes[1].offset == pytest.approx(1.40)  # 10 - 0 <= 40 - 10: the frame's end
    assert notes[2].offset == pytest.approx(8.00)  # 200 + 600 frames
    assert notes[3].offset == pytest.approx(11.99)  # the last frame
    first, second = sorted((n for n in kong_notes(rolls, FPS) if n.pitch == 25),
                           key=lambda n: n.onset)
    assert first.onset == pytest.approx(3.006, abs=1e-6) and first.offset == pytest.approx(3.29)
    assert second.onset == pytest.approx(3.302, abs=1e-6)
    assert notes[5].offset == pytest.approx(5.60)
    assert notes[6].velocity == 127 and notes[0].velocity == 64
    pedals = kong_pedals(pedal, FPS)
    assert len(pedals) == 3
    assert pedals[0][0] == pytest.approx(0.50) and pedals[0][1] == pytest.approx(1.403, abs=1e-6)
    # Kong's rule: a pedal frame still rising after the offset peak presses the pedal again
    assert pedals[1] == pytest.approx((1.41, 1.50))
    assert pedals[2] == pytest.approx((3.00, 4.00))


def test_hand_built_cases_match_kong() -> None:
    rolls, pedal = _case_rolls()
    kong, kong_ped = _kong_post(rolls, pedal)
    _assert_same_notes(_ours(kong_notes(rolls, FPS)), kong)
    _assert_same_pedals(kong_pedals(pedal, FPS), kong_ped)


def test_restrike_next_frame_clamped_like_kong_but_ordered() -> None:
    """A two-frame plateau gives two onset peaks a frame apart: Kong's first note ends (at the
    second's frame - 1) half a frame before it starts; ours ends at its onset."""
    r = _empty(400)
    r["onset"][95:103, 10] = [0.0, 0.2, 0.4, 0.6, 0.6, 0.4, 0.2, 0.0]
    r["frame"][98:200, 10] = 0.8
    r["velocity"][90:110, 10] = 0.5
    ours = _ours(kong_notes(r, FPS))
    assert len(ours) == 2 and ours[0][2] == ours[0][1] == pytest.approx(0.985, abs=1e-6)
    kong, _ = _kong_post(r)
    assert kong[0][2] < kong[0][1]  # Kong: offset before onset
    _assert_same_notes(ours, kong)


def test_plateau_is_finite_where_kong_is_nan() -> None:
    """Three equal frames at the top: Kong's shift is 0 / 0, a NaN onset; ours is shift 0."""
    r = _empty(400)
    r["onset"][95:102, 10] = [0.0, 0.2, 0.5, 0.5, 0.5, 0.2, 0.0]
    r["frame"][97:200, 10] = 0.8
    r["velocity"][90:110, 10] = 0.5
    ours = _ours(kong_notes(r, FPS))
    assert len(ours) == 3
    assert all(math.isfinite(x) for n in ours for x in n[1:3])
    assert ours[1][1] == pytest.approx(0.98)  # the middle frame, unshifted
    kong, _ = _kong_post(r)
    assert len(kong) == 3 and math.isnan(kong[1][1])
    assert ours[0][1] == pytest.approx(kong[0][1], abs=1e-4)
    assert ours[2][1:] == pytest.approx(kong[2][1:], abs=1e-4)


# ---- plain behaviour (no peer package) ----


def test_clean_triangle_gives_one_note() -> None:
    r = _empty(500)
    _note(r, 39, 120.25, 180, offset_peak=179.5, vel=0.7)
    (note,) = kong_notes(r, FPS, start=10.0)
    assert note.pitch == 60 and note.velocity == int(0.7 * 128)
    assert note.onset == pytest.approx(11.2025, abs=1e-6)
    assert note.offset == pytest.approx(11.795, abs=1e-6)


def test_offsets_never_before_onsets() -> None:
    rng = np.random.default_rng(7)
    rolls, _ = _random_rolls(rng, 2000)
    for k in ("onset", "offset"):  # ties everywhere: plateaus, adjacent peaks
        rolls[k] = np.round(rolls[k], 1)
    notes = kong_notes(rolls, FPS, RollDecodeConfig(onset_threshold=0.2))
    assert notes and all(n.offset >= n.onset and math.isfinite(n.onset) for n in notes)
    assert all(0 <= n.velocity <= 127 for n in notes)


@pytest.mark.parametrize("t", [0, 3, 5, 400])
def test_empty_rolls(t: int) -> None:
    assert kong_notes(_empty(t), FPS) == []
    zeros = {k: np.zeros((t, 1), np.float32) for k in ("pedal_onset", "pedal_offset",
                                                      "pedal_frame")}
    assert kong_pedals(zeros, FPS) == []


def test_bad_shapes_refused() -> None:
    r = _empty(10)
    r["frame"] = np.zeros((9, 88), np.float32)
    with pytest.raises(ValueError):
        kong_notes(r, FPS)


# ---- segmenting ----


@pytest.mark.parametrize("n_samples", [3 * 16000, 10 * 16000, 10 * 16000 + 1, 27 * 16000])
def test_windows_and_kept_frames_match_enframe_deframe(n_samples: int) -> None:
    rng = np.random.default_rng(n_samples)
    audio = rng.standard_normal(n_samples).astype(np.float32)
    seg = KONG_SEGMENT_SAMPLES
    padded = np.concatenate([audio, np.zeros(-n_samples % seg, np.float32)])
    segments = (padded[i:i + seg] for i in range(0, len(padded), seg))
    ours = list(kong_windows(segments))
    count = kong_window_count(n_samples)
    assert len(ours) == count
    frames = 10 * FPS + 1
    rolls = rng.random((count, frames, 3)).astype(np.float32)
    ours_timeline = np.concatenate(
        [rolls[i, kong_kept_frames(i, count, frames)] for i in range(count)])

    _kong()
    from piano_transcription_inference.inference import PianoTranscription

    theirs = PianoTranscription.enframe(None, padded[None, :], seg)
    assert theirs.shape[0] == count
    for w, (a, b) in enumerate(zip(ours, theirs)):
        np.testing.assert_array_equal(a, b, err_msg=f"window {w}")
    np.testing.assert_array_equal(ours_timeline, PianoTranscription.deframe(None, rolls))


def test_window_helpers_plain() -> None:
    assert kong_window_count(0) == 1  # one silent segment, as runtime/audio.py yields
    assert kong_window_count(1) == 1
    assert kong_window_count(160000) == 1
    assert kong_window_count(160001) == 3
    assert kong_kept_frames(0, 1, 1001) == slice(0, 1001)
    assert [kong_kept_frames(i, 3, 1001) for i in range(3)] == [
        slice(0, 750), slice(250, 750), slice(250, 1000)]
    a, b = np.ones(4, np.float32), np.full(4, 2, np.float32)
    got = list(kong_windows(iter([a, b])))
    assert [w.tolist() for w in got] == [[1, 1, 1, 1], [1, 1, 2, 2], [2, 2, 2, 2]]
