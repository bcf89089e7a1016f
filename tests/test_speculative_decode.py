"""Speculative decoding end to end: drafts read from rolls (runtime/speculative.py RollDraft),
decode_batch with them giving greedy decoding's tokens (a history-hashing fake model, whose
drafts mostly disagree, and the shipped model, whose drafts mostly agree), and the
`--speculative` option of the Transcriber and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pianolm.engines import DEFAULT_MODEL_DIR
from pianolm.runtime import vocab as V
from pianolm.runtime.audio import load_audio, normalise_peak, segment_audio
from pianolm.runtime.cli import main
from pianolm.runtime.decode import RowSpec, Speculation, decode_batch
from pianolm.runtime.manifest import ManifestError, load_manifest
from pianolm.runtime.ort_backend import OrtBackend
from pianolm.runtime.rolls import RollDecodeConfig
from pianolm.runtime.speculative import RollDraft
from pianolm.runtime.transcriber import Transcriber
from tests.fake_backend import FakeBackend
from tests.piece import CLIP

FPS = 50.0


def _rolls(notes: list[tuple[int, int, int, float]], frames: int = 501) -> dict:
    """Rolls with one onset peak per (on frame, off frame or -1: to the end, pitch, velocity)."""
    rolls = {k: np.zeros((frames, 88), np.float32) for k in ("onset", "offset", "frame",
                                                              "velocity")}
    for on, off, pitch, vel in notes:
        k = pitch - V.MIN_PITCH
        rolls["onset"][on, k] = 1.0
        rolls["frame"][on:off if off >= 0 else frames, k] = 1.0
        rolls["velocity"][on, k] = vel
    return rolls


def test_roll_draft_guesses_every_stage():
    cfg = RollDecodeConfig(subframe=False)
    draft = RollDraft.from_rolls(_rolls([(10, 30, 60, 0.5), (100, -1, 64, 0.8),
                                         (40, 45, 60, 0.2)]), FPS, cfg)
    assert draft.onsets == [(20, 60), (80, 60), (200, 64)]  # ticks: 2 per frame at 50 fps
    assert draft.velocity(21, 60) == V.velocity_token(64)  # 0.5 x 127, the nearest note's
    assert draft.velocity(200, 64) == V.velocity_token(102)
    assert draft.velocity(500, 70) == V.velocity_token(draft.default_velocity)  # no such note
    assert draft.offset(20, 60, 80) == V.time_token(60)  # the frame roll lets go at frame 30
    assert draft.offset(20, 60, 50) == V.time_token(50)  # never past the key's next onset
    assert draft.offset(200, 64, -1) == V.NOTE_SUSTAIN  # sounding at the segment's end
    assert draft.offset(0, 64, 150) == V.time_token(2)  # carried: silent from the start
    assert draft.offset(0, 60, -1) == V.time_token(2)
    quiet = RollDraft.from_rolls(_rolls([]), FPS, cfg)
    assert quiet.onsets == [] and quiet.offset(0, 40, -1) == V.time_token(2)
    held = RollDraft.from_rolls(_rolls([(0, 25, 70, 0.5), (0, -1, 72, 0.5)]), FPS, cfg)
    assert held.offset(0, 70, -1) == V.time_token(50)  # a carried note the roll holds
    assert held.offset(0, 72, -1) == V.NOTE_SUSTAIN


def _audio(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 160000)).astype(np.float32)


@pytest.mark.parametrize("droppable", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_speculative_batch_equals_greedy_with_a_fake_model(droppable, seed):
    """A chain of segments (carried notes pass between rows) and two files in one batch: every
    stage's tokens and the carried notes are greedy decoding's, concurrent or not."""
    rows = [RowSpec(0), RowSpec(1, 0), RowSpec(2, 1), RowSpec(0), RowSpec(1, 3)]
    audio = _audio(len(rows), seed)
    speculation = Speculation(FPS, RollDecodeConfig(onset_threshold=0.2, frame_threshold=0.1))
    greedy = decode_batch(FakeBackend(droppable=droppable), audio, rows, max_notes=14)
    assert any(s.carry_out for s in greedy), "nothing carried: the test is weak"
    for concurrent in (False, True):
        stats: dict = {}
        got = decode_batch(FakeBackend(droppable=droppable), audio, rows, max_notes=14,
                           concurrent=concurrent, speculation=speculation, stats=stats)
        assert [(s.tokens, s.carry_out) for s in got] == \
            [(s.tokens, s.carry_out) for s in greedy]
        assert stats["onset"].drafted > 0 and stats["velocity"].drafted > 0


def test_speculation_needs_rolls():
    class NoRolls(FakeBackend):
        def encode_with_rolls(self, audio):
            return self.encode(audio), None

    with pytest.raises(ValueError, match="drafts from the encoder's rolls"):
        decode_batch(NoRolls(), _audio(1, 0), [RowSpec(0)],
                     speculation=Speculation(FPS, RollDecodeConfig()))


def test_shipped_model_speculative_notes_equal_greedy():
    """The trained model on real piano audio: identical tokens, fewer decoder calls."""
    backend = OrtBackend(DEFAULT_MODEL_DIR, threads=1)
    m = backend.manifest
    piece = normalise_peak(load_audio(CLIP), m.input_peak)
    audio = segment_audio(np.concatenate([piece, piece]))[:2]  # notes carried across
    rows = [RowSpec(0), RowSpec(1, 0)]
    greedy_stats: dict = {}
    greedy = decode_batch(backend, audio, rows, stats=greedy_stats)
    stats: dict = {}
    got = decode_batch(backend, audio, rows, speculation=Speculation(
        m.encoder.frames_per_second, m.encoder.rolls.thresholds), stats=stats)
    assert [(s.tokens, s.carry_out) for s in got] == [(s.tokens, s.carry_out) for s in greedy]
    assert sum(len(s.tokens["velocity"]) for s in got) > 30  # notes to speculate on
    calls = {stage: (greedy_stats[stage].calls, stats[stage].calls) for stage in stats}
    assert all(spec < plain for plain, spec in calls.values()), calls


def test_transcriber_speculative_option(exported, tmp_path):
    from tests.test_export_manifest import older_copy

    assert Transcriber(DEFAULT_MODEL_DIR, decoder="lm").speculation is None  # auto, CPU
    assert Transcriber(DEFAULT_MODEL_DIR, decoder="lm", speculative=True).speculation
    assert Transcriber(DEFAULT_MODEL_DIR, decoder="rolls", speculative=True).speculation is None
    old = older_copy(exported.dirs["hier"], tmp_path / "old", 5)
    assert Transcriber(old, decoder="lm").speculation is None
    with pytest.raises(ManifestError, match="every position's logits.*--speculative off"):
        Transcriber(old, decoder="lm", speculative=True)
    flat = exported.dirs["flat"]
    assert load_manifest(flat).stage_names == ("flat",)
    fast = Transcriber(flat, decoder="lm", speculative=True)  # the flat baseline speculates too
    assert fast.speculation is not None
    greedy = Transcriber(flat, decoder="lm", speculative=False).transcribe(CLIP).notes
    assert fast.transcribe(CLIP).notes == greedy


def test_cli_speculative_reports_acceptance_and_refuses_old_models(exported, tmp_path, capsys):
    from tests.test_export_manifest import older_copy

    report = tmp_path / "r.json"
    code = main(["transcribe", str(CLIP), "-o", str(tmp_path / "a.mid"), "--decoder", "lm",
                 "--speculative", "on", "--threads", "1", "--report-json", str(report)])
    out, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads(report.read_text())
    assert r["speculative"] is True and r["drafted"] > 0 and 0 < r["acceptance"] <= 1
    assert r["calls_per_note"] > 0 and r["tokens_per_call"] > 1
    assert "draft tokens accepted" in out
    old = older_copy(exported.dirs["hier"], tmp_path / "old", 5)
    code = main(["transcribe", str(CLIP), "-o", str(tmp_path / "b.mid"), "--model", str(old),
                 "--speculative", "on"])
    _, err = capsys.readouterr()
    assert code != 0 and err.count("\n") == 1 and "--speculative off" in err, err
    assert not (tmp_path / "b.mid").exists()
