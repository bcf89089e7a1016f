"""Renderers: every installed piano produces audio of the right length, whose energy onsets
line up with the notes, at the right pitch, and whose sustain pedal audibly holds a note.

A renderer whose binary or sounds are missing is skipped with the reason (install them with
scripts/install_renderers.sh).
"""

from __future__ import annotations

import mido
import numpy as np
import pytest

from pianolm.export.data import render as R
from pianolm.runtime.notes import Note

SR = R.SAMPLE_RATE
AVAILABLE = R.available_instruments()
MELODY = [Note(0.3 + 0.4 * i, 0.3 + 0.4 * i + 0.25, p, v)
          for i, (p, v) in enumerate([(60, 90), (64, 70), (67, 100), (72, 60), (55, 110),
                                      (79, 80), (48, 95), (84, 75)])]


def need(instrument: str) -> None:
    reason = AVAILABLE[instrument]
    if reason:
        print(f"skip {instrument}: {reason}")
        pytest.skip(f"{instrument}: {reason}")


def spectral_flux(x: np.ndarray, hop: int = 80, n_fft: int = 512) -> np.ndarray:
    """Positive log-spectral flux per hop (5 ms at 16 kHz), frame i centred at i * hop."""
    padded = np.pad(x, (n_fft // 2, n_fft // 2))
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop] * np.hanning(n_fft)
    mag = np.log1p(100.0 * np.abs(np.fft.rfft(frames, axis=1)))
    return np.concatenate([[0.0], np.maximum(np.diff(mag, axis=0), 0.0).sum(axis=1)])


def onset_errors(x: np.ndarray, onsets: list[float], hop: int = 80) -> list[float]:
    flux = spectral_flux(x, hop)
    errs = []
    for t in onsets:
        a, b = int((t - 0.1) * SR / hop), int((t + 0.1) * SR / hop)
        k = a + int(np.argmax(flux[a:b]))
        errs.append(k * hop / SR - t)
    return errs


def fundamental(x: np.ndarray, lo: float = 80.0, hi: float = 1000.0) -> float:
    """The strongest spectral peak between lo and hi Hz (zero-padded FFT, 0.25 Hz bins)."""
    n = 1 << 16
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x)), n))
    f = np.fft.rfftfreq(n, 1.0 / SR)
    band = (f >= lo) & (f <= hi)
    return float(f[band][np.argmax(spec[band])])


@pytest.mark.parametrize("instrument", list(R.INSTRUMENTS))
def test_melody_length_level_and_onsets(instrument):
    need(instrument)
    y = R.render(MELODY, [], instrument, seed=1, duration=3.8)
    assert y.dtype == np.float32 and y.ndim == 1
    assert len(y) == int(round(3.8 * SR))
    assert np.isfinite(y).all()
    assert np.sqrt(np.mean(y**2)) > 1e-3, "silent render"
    assert np.abs(y[: int(0.25 * SR)]).max() < 0.05 * np.abs(y).max(), "sound before the 1st note"
    errs = onset_errors(y, [n.onset for n in MELODY])
    assert max(abs(e) for e in errs) <= 0.030, [round(e * 1000) for e in errs]


@pytest.mark.parametrize("instrument", list(R.INSTRUMENTS))
def test_pitch_is_right(instrument):
    need(instrument)
    # A4 = 440 Hz; C#4 and D4 are shifted samples in the sampler (C4 up, D#4 down)
    for pitch in (69, 61, 62):
        y = R.render([Note(0.05, 0.8, pitch, 90)], [], instrument, duration=0.9)
        f0 = 440.0 * 2 ** ((pitch - 69) / 12)
        f = fundamental(y[int(0.1 * SR): int(0.8 * SR)], lo=f0 * 0.8, hi=f0 * 1.2)
        cents = 1200 * np.log2(f / f0)
        assert abs(cents) < 25, (pitch, f, f0)


@pytest.mark.parametrize("instrument", list(R.INSTRUMENTS))
def test_pedal_holds_a_released_note(instrument):
    need(instrument)
    note = [Note(0.1, 0.3, 60, 100)]
    dry = R.render(note, [], instrument, duration=2.0)
    wet = R.render(note, [(0.05, 1.6)], instrument, duration=2.0)
    window = slice(int(0.8 * SR), int(1.4 * SR))
    e_dry = float(np.mean(dry[window] ** 2)) + 1e-12
    e_wet = float(np.mean(wet[window] ** 2))
    assert 10 * np.log10(e_wet / e_dry) > 10.0, (e_dry, e_wet)
    # before the key release both are the same note
    head = slice(int(0.1 * SR), int(0.25 * SR))
    assert np.sqrt(np.mean(wet[head] ** 2)) > 0.5 * np.sqrt(np.mean(dry[head] ** 2))


def test_tinysoundfont_backend():
    if R.find_soundfont("TimGM6mb.sf2") is None or not R._tinysoundfont_available():
        reason = "tinysoundfont or TimGM6mb.sf2 not installed"
        print(f"skip: {reason}")
        pytest.skip(reason)
    y = R.render(MELODY, [], "timgm6mb", duration=3.8, backend="tinysoundfont")
    assert len(y) == int(round(3.8 * SR)) and np.sqrt(np.mean(y**2)) > 1e-3
    errs = onset_errors(y, [n.onset for n in MELODY])
    assert max(abs(e) for e in errs) <= 0.030
    note = [Note(0.1, 0.3, 60, 100)]
    dry = R.render(note, [], "timgm6mb", duration=2.0, backend="tinysoundfont")
    wet = R.render(note, [(0.05, 1.6)], "timgm6mb", duration=2.0, backend="tinysoundfont")
    w = slice(int(0.8 * SR), int(1.4 * SR))
    assert np.mean(wet[w] ** 2) > 10 * (np.mean(dry[w] ** 2) + 1e-12)


def test_render_midi_carries_pedal_and_program():
    notes = [Note(0.5, 1.0, 60, 80), Note(1.0, 1.5, 60, 90)]
    mid = R.render_midi(notes, [(0.2, 1.2)], program=1, duration=2.0)
    msgs = list(mid.tracks[0])
    assert any(m.type == "program_change" and m.program == 1 for m in msgs)
    cc = [m.value for m in msgs if m.type == "control_change" and m.control == 64]
    assert cc[-2:] == [127, 0]
    assert abs(mid.length - 2.0) < 1e-3
    # a re-strike at 1.0 s: the note_off of the first note comes before the new note_on
    t, order = 0.0, []
    for m in msgs:
        t += mido.tick2second(m.time, mid.ticks_per_beat, 500000)
        if m.type in ("note_on", "note_off") and abs(t - 1.0) < 1e-6:
            order.append(m.type)
    assert order == ["note_off", "note_on"]


def test_sample_names_parse():
    assert R.sample_name_to_pitch("A0v1.ogg") == (21, 1)
    assert R.sample_name_to_pitch("D#4v8.ogg") == (63, 8)
    assert R.sample_name_to_pitch("C8v16.ogg") == (108, 16)
    assert R.sample_name_to_pitch("README.md") is None
    assert R.iowa_name_to_pitch("Piano.ff.A0.flac") == (21, 3)
    assert R.iowa_name_to_pitch("Piano.pp.Ab1.flac") == (32, 1)
    assert R.iowa_name_to_pitch("Piano.mf.C8.flac") == (108, 2)
    assert R.iowa_name_to_pitch("C4v8.ogg") is None


def test_unknown_or_missing_instrument_says_why():
    with pytest.raises(R.RenderError, match="unknown instrument"):
        R.render(MELODY, [], "harpsichord")
    assert set(AVAILABLE) == set(R.INSTRUMENTS)
    for name, reason in AVAILABLE.items():
        print(f"{name}: {'ok' if reason is None else reason}")


def test_default_duration_covers_pedal_and_tail():
    first_available = next((k for k, v in AVAILABLE.items() if v is None), None)
    if first_available is None:
        pytest.skip("no renderer installed")
    y = R.render([Note(0.1, 0.4, 60, 80)], [(0.2, 1.5)], first_available)
    assert len(y) == int(round((1.5 + R.RELEASE_TAIL) * SR))
