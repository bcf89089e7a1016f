"""The shipped default model (engines/default/): it is there, it is what the package ships,
and `pianolm transcribe` with no --model transcribes real piano audio it has never seen.

The audio is rendered here from a fixed little piece (scale, chords, repeated notes, two
hands) with two pianos: Salamander Grand recordings (NumPy sampler) and FluidR3 through
fluidsynth. The floors sit well below what the model measures (README, "The default model"),
so they catch a broken model, export or runtime, not a small regression.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from pianolm.engines import DEFAULT_MODEL_DIR
from pianolm.runtime.manifest import load_manifest
from pianolm.runtime.midi import read_midi
from pianolm.runtime.notes import Note

ONSET_F_FLOOR = 0.8
ONSET_OFFSET_F_FLOOR = 0.4


def _piece() -> list[Note]:
    notes: list[Note] = []
    t = 0.3
    for i, p in enumerate([60, 62, 64, 65, 67, 69, 71, 72]):  # C major scale, rising loudness
        notes.append(Note(t, t + 0.25, p, 40 + 8 * i))
        t += 0.3
    for chord in ([48, 55, 64], [53, 57, 65, 72], [43, 55, 62, 71]):  # block chords
        notes += [Note(t, t + 0.8, p, 85) for p in chord]
        t += 1.0
    for _ in range(4):  # repeated notes
        notes.append(Note(t, t + 0.12, 76, 70))
        t += 0.2
    for k, p in enumerate([36, 43, 48, 52, 55, 60, 64, 67]):  # an arpeggio over a held bass
        notes.append(Note(t + 0.15 * k, t + 1.6, p, 60 + 5 * k))
    return notes


def test_default_model_is_shipped_within_budget():
    manifest = load_manifest(DEFAULT_MODEL_DIR)
    assert manifest.stage_names == ("onset", "velocity", "offset")
    files = [DEFAULT_MODEL_DIR / g.file for g in manifest.graphs().values()]
    assert all(f.is_file() for f in files)
    size = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.iterdir() if f.is_file())
    assert size <= 40e6, f"default model is {size / 1e6:.1f} MB (budget 40 MB)"
    for name in ("LICENSE.md", "MODEL.md"):
        assert (DEFAULT_MODEL_DIR / name).is_file(), f"{name}: licence and training data"


@pytest.mark.parametrize("instrument", ["salamander", "fluidr3-grand"])
def test_transcribe_with_no_model_flag(instrument, tmp_path):
    render_mod = pytest.importorskip("pianolm.export.data.render")
    pytest.importorskip("mir_eval")
    reason = render_mod.unavailable_reason(instrument)
    if reason:
        pytest.skip(f"{instrument} renderer unavailable: {reason} "
                    "(bash scripts/install_renderers.sh)")
    from pianolm.runtime.metrics import score_notes

    notes = _piece()
    audio = render_mod.render(notes, [], instrument, seed=0, duration=max(n.offset for n in notes)
                              + 1.0)
    audio = 0.7 * audio / max(1e-6, float(np.abs(audio).max()))
    wav = tmp_path / "piece.wav"
    sf.write(wav, audio, 16000)
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pianolm.runtime.cli", "transcribe", str(wav),
                           "--report-json", str(report)],
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    got = read_midi(tmp_path / "piece.mid")
    scores = score_notes(got, notes)
    assert scores["onset_f"] >= ONSET_F_FLOOR, scores
    assert scores["onset_offset_f"] >= ONSET_OFFSET_F_FLOOR, scores
    assert json.loads(report.read_text())["notes"] == len(got)


def test_info_describes_the_shipped_model_by_default(capsys):
    """`pianolm info` with no options counts the parameters of what `transcribe` runs."""
    pytest.importorskip("torch", reason="pianolm info is torch-side")
    from pianolm.runtime.cli import main

    manifest = json.loads((DEFAULT_MODEL_DIR / "manifest.json").read_text())
    assert main(["info"]) in (0, None)
    first = capsys.readouterr().out.splitlines()[0]
    decoder = manifest["stages"][0]["decoder"]
    assert f"encoder {manifest['encoder']['name']} " in first
    sizes = f"{decoder['n_layers']} layers, d {decoder['d_model']}, {decoder['n_heads']} heads"
    assert sizes in first
