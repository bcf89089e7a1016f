"""Transcriber: streaming segments of several inputs through the decode loop in batches.

Notes must not depend on how inputs are batched (batch 1 = each segment alone, carried notes
handed over between batches; larger batches mix files and chain segments inside one batch).
The fake model (tests/fake_backend.py) makes any dependence on batch composition visible.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from pianolm.runtime import transcriber as T
from pianolm.runtime.transcriber import ModelNotFoundError, Transcriber
from tests.fake_backend import FakeBackend

RATE = 16000


def _clip(seconds: float, seed: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.normal(size=int(seconds * RATE))).astype(np.float32), RATE


CLIPS = [_clip(25.0, 0), _clip(4.5, 1), _clip(31.0, 2), _clip(10.0, 3)]  # 3 + 1 + 4 + 1 segments


def _notes(batch: int, droppable: bool = False, concurrent: bool = True) -> list[list]:
    t = Transcriber(backend=FakeBackend(droppable=droppable), batch=batch, max_notes=12,
                    concurrent=concurrent)
    return [r.notes for r in t.transcribe_many(CLIPS)]


def test_notes_do_not_depend_on_batching():
    reference = [Transcriber(backend=FakeBackend(), max_notes=12).transcribe(c).notes
                 for c in CLIPS]
    assert all(reference), "the fake model should produce notes for every clip"
    for batch in (1, 2, 3, 8, 16):
        assert _notes(batch) == reference, batch
    assert _notes(4, droppable=True, concurrent=False) == reference


def test_velocity_and_offset_run_side_by_side_only_with_spare_cores(monkeypatch):
    from pianolm.runtime.decode import concurrent_by_default

    assert concurrent_by_default("cuda", None) and concurrent_by_default("tensorrt", 8, cores=2)
    assert not concurrent_by_default("cpu", None, cores=64)  # each session takes every core
    assert concurrent_by_default("cpu", 2, cores=4)
    assert not concurrent_by_default("cpu", 2, cores=3)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert not Transcriber(backend=FakeBackend()).concurrent
    assert Transcriber(backend=FakeBackend(), threads=2).concurrent
    assert not Transcriber(backend=FakeBackend(), threads=2, concurrent=False).concurrent
    t = Transcriber(backend=FakeBackend(), threads=2, max_notes=12)
    t.transcribe(CLIPS[1])
    assert t.report.concurrent and "velocity and offset concurrent" in t.report.format()
    from pianolm.runtime.cli import build_parser
    from pianolm.runtime.decode import SCHEDULES

    commands = build_parser()._subparsers._group_actions[0].choices
    for command in ("transcribe", "eval"):  # the CLI spells them out to stay import-free
        (option,) = [a for a in commands[command]._actions if a.dest == "schedule"]
        assert tuple(option.choices) == SCHEDULES and option.default == "auto"


def test_results_come_in_input_order_with_durations():
    t = Transcriber(backend=FakeBackend(), batch=4, max_notes=12)
    results = list(t.transcribe_many(CLIPS))
    assert [r.duration_s for r in results] == pytest.approx([25.0, 4.5, 31.0, 10.0])
    for r in results:  # stitched notes end with the audio
        assert all(0 <= n.onset < n.offset <= r.duration_s + 1e-6 for n in r.notes)


def test_batches_are_bounded_and_audio_is_read_lazily(tmp_path):
    """A long file is never held whole: each encoder call sees at most `batch` segments, and
    the file is read while decoding goes on (not all up front)."""
    path = tmp_path / "long.wav"
    sf.write(path, _clip(95.0, 4)[0], RATE)  # 10 segments
    backend = FakeBackend()
    seen: list[int] = []
    encode = backend.encode

    def spy(audio):
        seen.append(len(audio))
        return encode(audio)

    backend.encode = spy
    results = Transcriber(backend=backend, batch=3, max_notes=4).transcribe_many([path])
    next(results)
    assert seen == [3, 3, 3, 1]


def test_files_and_arrays_give_the_same_notes(tmp_path):
    samples, rate = CLIPS[0]
    path = tmp_path / "clip.wav"
    sf.write(path, samples, rate, subtype="FLOAT")
    t = Transcriber(backend=FakeBackend(), batch=2, max_notes=12)
    assert t.transcribe(path).notes == t.transcribe((samples, rate)).notes


def test_report_figures_add_up():
    t = Transcriber(backend=FakeBackend(), batch=4, max_notes=12)
    results = list(t.transcribe_many(CLIPS))
    r = t.report
    assert r.files == 4 and r.audio_s == pytest.approx(70.5)
    assert r.notes == sum(len(x.notes) for x in results)
    assert r.decode_tokens > r.notes > 0
    assert set(r.stages) == {"onset", "velocity", "offset"}
    for s in r.stages.values():
        assert s["steps"] > 0 and s["step_ms"] is not None and s["cross_kv_ms"] is not None
    assert 0 < r.time_to_first_note_s <= r.wall_s
    assert r.real_time_factor == pytest.approx(r.wall_s / r.audio_s, rel=1e-3)
    d = r.to_dict()
    assert d["batch"] == 4 and d["peak_rss_mb"] > 0 and "tokens_per_s" in d
    assert "real-time factor" in r.format()


def test_missing_default_model_is_one_clear_error(tmp_path, monkeypatch):
    import pianolm.engines

    monkeypatch.setattr(pianolm.engines, "DEFAULT_MODEL_DIR", tmp_path / "default")
    with pytest.raises(ModelNotFoundError, match="no default model is shipped") as e:
        Transcriber()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_batch_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="batch"):
        Transcriber(backend=FakeBackend(), batch=bad)


def test_unknown_backend_name(tmp_path):
    with pytest.raises(ValueError, match="unknown backend"):
        T.open_backend("metal", tmp_path)


def test_rolls_decoder_equals_decoding_the_encoders_rolls(exported, tmp_path):
    """decoder="rolls": the notes are runtime/rolls.py's reading of the encoder graph's rolls
    (segments joined, the manifest's thresholds), batch for batch; the manifest's
    default_decoder picks it when no decoder is given; a bad choice is refused."""
    import json

    from pianolm.runtime.audio import tail_start, transcription_segments
    from pianolm.runtime.manifest import ManifestError, load_manifest
    from pianolm.runtime.ort_backend import OrtBackend
    from pianolm.runtime.rolls import decode_rolls, join_segments
    from pianolm.runtime.transcriber import segment_align

    folder = exported.dirs["hier"]
    manifest = load_manifest(folder)
    assert manifest.default_decoder == "lm" and manifest.encoder.rolls is not None
    clips = [_clip(14.0, 5), _clip(3.0, 6)]
    backend = OrtBackend(folder, threads=1)
    want = []
    align = segment_align(backend)
    for samples, _ in clips:
        # the 14 s clip's last segment is end-aligned, the 3 s clip tiled (audio.py)
        audio = np.stack(list(transcription_segments([samples], align)))
        _, rolls = backend.encode_with_rolls(audio)
        joined = join_segments(rolls, manifest.encoder.frames_per_second, n_samples=len(samples),
                               last_start=tail_start(len(samples), align))
        want.append(decode_rolls(joined, manifest.encoder.frames_per_second,
                                 manifest.encoder.rolls.thresholds))
    assert any(want), "the tiny model's rolls should give some notes"
    for batch in (1, 3):
        t = Transcriber(folder, batch=batch, threads=1, decoder="rolls")
        assert [r.notes for r in t.transcribe_many(clips)] == want, batch
        assert t.report.decoder == "rolls" and t.report.notes == sum(map(len, want))

    # the manifest's default_decoder
    copy = tmp_path / "model"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).symlink_to(f)
    raw = json.loads((folder / "manifest.json").read_text())
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").write_text(json.dumps({**raw, "default_decoder": "rolls"}))
    assert Transcriber(copy, threads=1).decoder == "rolls"
    assert Transcriber(copy, threads=1, decoder="lm").decoder == "lm"
    from pianolm.runtime.cli import build_parser
    from pianolm.runtime.manifest import DECODERS

    (tr,) = [a for a in build_parser()._subparsers._group_actions[0].choices["transcribe"]
             ._actions if a.dest == "decoder"]
    assert tuple(tr.choices) == DECODERS  # the CLI spells them out to stay import-free
    with pytest.raises(ValueError, match="unknown decoder 'beam'"):
        Transcriber(copy, threads=1, decoder="beam")
    (copy / "manifest.json").write_text(json.dumps({**raw, "default_decoder": "greedy"}))
    with pytest.raises(ManifestError, match="default_decoder.*'greedy'"):
        load_manifest(copy)
    encoder = {k: v for k, v in raw["encoder"].items() if k != "rolls"}  # a format-1 encoder
    encoder["graph"] = {**encoder["graph"], "outputs": [o for o in encoder["graph"]["outputs"]
                                                        if o["name"] == "embeddings"]}
    (copy / "manifest.json").write_text(json.dumps({**raw, "encoder": encoder}))
    assert load_manifest(copy).default_decoder == "lm"
    (copy / "manifest.json").write_text(json.dumps({**raw, "encoder": encoder,
                                                    "default_decoder": "rolls"}))
    with pytest.raises(ManifestError, match="default_decoder.*no roll outputs"):
        load_manifest(copy)


def test_input_peak_makes_the_notes_independent_of_the_recording_level(tmp_path):
    """A model trained on peak-normalised files (manifest audio.input_peak) must give the same
    notes for a file and the same file 12 dB quieter; without input_peak the fake model sees
    the level (so the check can fail), and a file gives the array's notes either way."""
    samples, rate = CLIPS[0]
    quiet = (samples * np.float32(0.25), rate)  # a power of two: the gains are exact

    def notes(source, peak):
        backend = FakeBackend()
        backend.input_peak = peak
        t = Transcriber(backend=backend, batch=2, max_notes=12)
        assert t.input_peak == peak
        return t.transcribe(source).notes

    assert notes((samples, rate), 0.5) == notes(quiet, 0.5)
    assert notes((samples, rate), None) != notes(quiet, None)
    path = tmp_path / "quiet.wav"
    sf.write(path, quiet[0], rate, subtype="FLOAT")
    assert notes(path, 0.5) == notes(quiet, 0.5)


def test_concurrent_calls_keep_their_own_reports():
    """Two threads transcribing at once through one Transcriber: each thread's t.report
    describes its own call (files, audio seconds), not the other's."""
    import threading

    t = Transcriber(backend=FakeBackend(), batch=2, max_notes=12)
    seen: dict[int, tuple[int, float]] = {}
    barrier = threading.Barrier(2)

    def run(k: int, clips) -> None:
        barrier.wait()
        list(t.transcribe_many(clips))
        seen[k] = (t.report.files, round(t.report.audio_s, 3))

    one, three = [_clip(4.0, 1)], [_clip(3.0, 2), _clip(5.0, 3), _clip(2.0, 4)]
    threads = [threading.Thread(target=run, args=(0, one)),
               threading.Thread(target=run, args=(1, three))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert seen == {0: (1, 4.0), 1: (3, 10.0)}
