"""The shipped default model (engines/default/): it is there, it is what the package ships,
and `pianolm transcribe` with no --model transcribes real piano audio it has never seen.

The audio is a fixed little piece (tests/piece.py: scale, chords, repeated notes, two hands)
played by two pianos: Salamander Grand recordings (the committed clip, so this always runs)
and FluidR3 through fluidsynth (rendered here, where the renderer is installed). The floors
sit well below what the model measures (README, "The default model"), so they catch a broken
model, export or runtime, not a small regression.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pianolm.engines import DEFAULT_MODEL_DIR
from pianolm.runtime.manifest import load_manifest
from pianolm.runtime.midi import read_midi, read_notes_tsv
from tests.piece import CLIP, NOTES, piece, render_piece

ONSET_F_FLOOR = 0.8
ONSET_OFFSET_F_FLOOR = 0.4


def test_default_model_is_shipped_within_budget():
    manifest = load_manifest(DEFAULT_MODEL_DIR)
    assert manifest.stage_names == ("onset", "velocity", "offset")
    files = [DEFAULT_MODEL_DIR / g.file for g in manifest.graphs().values()]
    assert all(f.is_file() for f in files)
    size = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.iterdir() if f.is_file())
    assert size <= 40e6, f"default model is {size / 1e6:.1f} MB (budget 40 MB)"
    for name in ("LICENSE.md", "MODEL.md"):
        assert (DEFAULT_MODEL_DIR / name).is_file(), f"{name}: licence and training data"


def _transcribe_and_score(audio: Path, tmp_path: Path) -> None:
    """`pianolm transcribe` with no --model: its notes against piece() above the floors."""
    pytest.importorskip("mir_eval")
    from pianolm.runtime.metrics import score_notes

    report = tmp_path / "report.json"
    out = tmp_path / "piece.mid"
    proc = subprocess.run([sys.executable, "-m", "pianolm.runtime.cli", "transcribe", str(audio),
                           "-o", str(out), "--report-json", str(report)],
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    got = read_midi(out)
    scores = score_notes(got, piece())
    assert scores["onset_f"] >= ONSET_F_FLOOR, scores
    assert scores["onset_offset_f"] >= ONSET_OFFSET_F_FLOOR, scores
    assert json.loads(report.read_text())["notes"] == len(got)


def test_transcribe_the_committed_clip(tmp_path):
    """Salamander Grand, committed (tests/piece.py): runs without the renderers."""
    committed = [(n.onset, n.offset, n.pitch, n.velocity) for n in read_notes_tsv(NOTES)]
    assert committed == [pytest.approx((n.onset, n.offset, n.pitch, n.velocity), abs=1e-6)
                         for n in piece()]  # the clip's notes are the piece's
    _transcribe_and_score(CLIP, tmp_path)


def test_transcribe_a_fresh_rendering(tmp_path):
    """FluidR3 through fluidsynth, rendered now: a second piano."""
    from pianolm.export.data.render import unavailable_reason

    reason = unavailable_reason("fluidr3-grand")
    if reason:
        pytest.skip(f"fluidr3-grand renderer unavailable: {reason} "
                    "(bash scripts/install_renderers.sh)")
    render_piece("fluidr3-grand", tmp_path / "piece.wav")
    _transcribe_and_score(tmp_path / "piece.wav", tmp_path)


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
