"""The server's batcher without HTTP (runtime/batcher.py): interleaved requests get the notes
Transcriber.transcribe gives each alone; bad audio fails its own request only; a cancelled one
stops costing work; a full batcher refuses with QueueFull; stop() drains."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pianolm.runtime.audio import AudioError
from pianolm.runtime.batcher import BatchRecord, QueueFull, SegmentBatcher
from pianolm.runtime.transcriber import Transcriber
from tests.struck_tones import struck_tones

RATE = 16000


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("batcher")
    out = {}
    for k, seconds in enumerate((2.0, 11.0, 34.0, 5.5, 75.0)):
        out[f"f{k}"] = root / f"f{k}.wav"
        sf.write(out[f"f{k}"], struck_tones(seconds, k), RATE, subtype="PCM_16")
    bad = struck_tones(25.0, 9)
    bad[int(21.0 * RATE)] = np.nan  # in the third segment
    out["nan"] = root / "nan.wav"
    sf.write(out["nan"], bad, RATE, subtype="FLOAT")
    return out


@pytest.fixture(scope="module")
def transcriber() -> Transcriber:
    return Transcriber(batch=4, threads=1, decoder="rolls")


def test_interleaved_requests_get_their_own_notes(files, transcriber):
    alone = {k: transcriber.transcribe(files[k]).notes for k in ("f0", "f1", "f2", "f3")}
    assert all(alone.values())
    records: list[BatchRecord] = []
    batcher = SegmentBatcher(transcriber, max_wait_s=0.05, on_batch=records.append)
    try:
        jobs = {k: batcher.submit(files[k]) for k in ("f0", "f1")}
        with pytest.raises(AudioError, match="NaN"):  # found by the input-peak scan at once
            batcher.submit(files["nan"])
        jobs |= {k: batcher.submit(files[k]) for k in ("f2", "f3")}
        got = {k: job.future.result(timeout=300).notes for k, job in jobs.items()}
    finally:
        batcher.stop(timeout=60)
    assert got == alone
    assert max(r.jobs for r in records) > 1  # segments of different requests shared batches
    assert not batcher.alive and batcher.depth == 0


def test_cancel_stops_work_and_a_full_batcher_refuses(files, transcriber):
    records: list[BatchRecord] = []
    gate = threading.Event()

    def on_batch(record: BatchRecord) -> None:
        records.append(record)
        gate.wait(timeout=60)  # hold the thread after the first batch

    batcher = SegmentBatcher(transcriber, max_wait_s=0.0, max_jobs=1, on_batch=on_batch)
    try:
        job = batcher.submit(files["f4"])  # 75 s: 8 segments, batches of 4 rows
        with pytest.raises(QueueFull, match="max-queue 1"):
            batcher.submit(files["f0"])
        deadline = time.monotonic() + 60
        while not records:  # the first batch is decoded, the thread held in on_batch
            assert time.monotonic() < deadline
            time.sleep(0.01)
        job.cancel()
        gate.set()
        with pytest.raises(CancelledError):  # the client left: no result
            job.future.result(timeout=60)
        second = batcher.submit(files["f0"])  # room again
        assert second.future.result(timeout=60).notes
    finally:
        gate.set()
        batcher.stop(timeout=60)
    # the long job's rows after its first batch were never decoded (then f0's one row)
    assert [r.rows for r in records] == [4, 1]


def test_stop_drains_then_refuses(files, transcriber):
    batcher = SegmentBatcher(transcriber, max_wait_s=0.0)
    job = batcher.submit(files["f1"])
    batcher.stop(timeout=120)
    assert job.future.done() and job.future.result().notes
    with pytest.raises(QueueFull, match="shutting down"):
        batcher.submit(files["f0"])


class _FailsOnSilence:
    """A backend that fails any batch holding a silent segment (a stand-in for a runtime
    failure that one request's input provokes)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def encode_with_rolls(self, audio: np.ndarray):
        if (np.abs(audio).max(axis=1) == 0).any():
            raise RuntimeError("the graph failed\non two lines")
        return self.inner.encode_with_rolls(audio)


def test_a_decode_failure_fails_its_own_request_only(files, transcriber, tmp_path):
    from pianolm.runtime.batcher import DecodeFailed

    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(3 * RATE, np.float32), RATE)
    fragile = Transcriber(backend=_FailsOnSilence(transcriber.backend), batch=4,
                          decoder="rolls")
    batcher = SegmentBatcher(fragile, max_wait_s=0.2)
    try:
        good = batcher.submit(files["f1"])
        bad = batcher.submit(silent)
        with pytest.raises(DecodeFailed, match="silent.wav: decoding failed: the graph failed "
                                               "on two lines"):
            bad.future.result(timeout=120)
        assert good.future.result(timeout=120).notes == transcriber.transcribe(files["f1"]).notes
    finally:
        batcher.stop(timeout=60)


def test_a_short_request_is_not_held_behind_a_long_one(files):
    """Round robin: with one row per batch, a 2 s request sent after a 75 s one is done long
    before it (FIFO would finish it last)."""
    one_row = Transcriber(batch=1, threads=1, decoder="rolls")
    order: list[str] = []
    batcher = SegmentBatcher(one_row, max_wait_s=0.0)
    try:
        long = batcher.submit(files["f4"])
        short = batcher.submit(files["f0"])
        long.future.add_done_callback(lambda _: order.append("long"))
        short.future.add_done_callback(lambda _: order.append("short"))
        long.future.result(timeout=300)
        short.future.result(timeout=300)
    finally:
        batcher.stop(timeout=60)
    assert order == ["short", "long"]
