"""`pianolm serve` as a user runs it: a real server in a subprocess on 127.0.0.1 (the shipped
model, and the tiny random-weight export for the LM path), a real HTTP client (httpx). Notes
equal the CLI's and do not depend on what else was in a batch; every bad request gets a 4xx
and one line, and the server keeps serving; a full queue answers 503; SIGTERM drains.
Everything is bounded in time, and each test stops the servers it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.struck_tones import struck_tones
from tests.tables import close_tables, table_rows

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (the dev extra)")
pytest.importorskip("fastapi", reason="pianolm serve needs the serve extra")

RATE = 16000
START_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """Lengths around the 10 s segment: short, just over one and two segments, longer."""
    root = tmp_path_factory.mktemp("clips")
    paths = {}
    for k, seconds in enumerate((1.5, 3.0, 10.4, 12.0, 20.3, 6.0, 25.0, 4.5)):
        paths[f"c{k}"] = root / f"c{k}.wav"
        audio = struck_tones(seconds, k, harmonics=(1, 2, 3), every_s=0.45)
        sf.write(paths[f"c{k}"], audio, RATE, subtype="PCM_16")
    return paths


@contextmanager
def serve(*args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`pianolm serve --port 0 ARGS` until /readyz answers; yields (base URL, process)."""
    proc = subprocess.Popen([sys.executable, "-m", "pianolm.runtime.cli", "serve", "--port",
                             "0", "--log-level", "warning", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # "pianolm serve: http://127.0.0.1:PORT/v1/transcribe"
        assert line.startswith("pianolm serve: http://"), line + proc.stderr.read()
        base = line.split()[2].rsplit("/v1/", 1)[0]
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _post(base: str, path: Path, fmt: str = "json", **kw) -> httpx.Response:
    return httpx.post(f"{base}/v1/transcribe", params={"format": fmt},
                      content=path.read_bytes(), timeout=120, **kw)


def _cli_notes(path: Path, tmp_path: Path, *args: str) -> str:
    out = tmp_path / f"{path.stem}.cli.mid"
    subprocess.run([sys.executable, "-m", "pianolm.runtime.cli", "transcribe", str(path), "-o",
                    str(out), "--notes", "tsv", "--overwrite", *args], check=True,
                   capture_output=True, timeout=300)
    return out.with_suffix(".tsv").read_text()


def _one_line_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and "Traceback" not in r.text
    return body["error"]


def _metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_shipped_model_notes_equal_the_cli_and_concurrency_changes_nothing(clips, tmp_path):
    with serve("--batch", "8", "--max-wait-ms", "50") as (base, _):
        # every format of one clip, against `pianolm transcribe` on the same file
        clip = clips["c4"]
        cli_tsv = _cli_notes(clip, tmp_path)
        assert _post(base, clip, "tsv").text == cli_tsv
        cli_mid = (tmp_path / f"{clip.stem}.cli.mid").read_bytes()
        r = _post(base, clip, "midi")
        assert r.headers["content-type"] == "audio/midi" and r.content == cli_mid
        multipart = httpx.post(f"{base}/v1/transcribe", params={"format": "tsv"}, timeout=120,
                               files={"file": (clip.name, clip.read_bytes(), "audio/wav")})
        assert multipart.text == cli_tsv
        body = _post(base, clip).json()
        assert len(body["notes"]) == len(cli_tsv.splitlines()) - 1 > 0
        assert body["model"]["decoder"] == "rolls" and len(body["model"]["sha256"]) == 64
        assert body["duration_s"] == pytest.approx(20.3, abs=1e-3)

        # 8 requests of different lengths, one at a time, then all at once
        serial = {k: _post(base, p).json()["notes"] for k, p in clips.items()}
        rows_before = _metric(base, "pianolm_batch_rows_sum")
        batches_before = _metric(base, "pianolm_batch_rows_count")
        with ThreadPoolExecutor(len(clips)) as pool:
            futures = {k: pool.submit(_post, base, p) for k, p in clips.items()}
            together = {k: f.result().json()["notes"] for k, f in futures.items()}
        assert together == serial
        rows = _metric(base, "pianolm_batch_rows_sum") - rows_before
        batches = _metric(base, "pianolm_batch_rows_count") - batches_before
        assert rows / batches > 1.5, "concurrent requests should share batches"
        assert _metric(base, 'pianolm_requests_total{status="200"}') >= 13


def test_bad_requests_get_one_line_and_the_server_keeps_serving(clips, tmp_path):
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.where(np.arange(3 * RATE) == 2 * RATE, np.nan, 0.1), RATE,
             subtype="FLOAT")
    truncated_flac = tmp_path / "t.flac"
    sf.write(truncated_flac, struck_tones(3, 0), RATE)
    truncated_flac.write_bytes(truncated_flac.read_bytes()[:300])
    with serve("--max-body-mb", "1") as (base, _):
        url = f"{base}/v1/transcribe"
        assert "NaN" in _one_line_error(_post(base, nan), 400)
        assert "request body" in _one_line_error(_post(base, truncated_flac), 400)
        assert "not recognised" in _one_line_error(
            httpx.post(url, content=b"plain text, not audio\n" * 20, timeout=30), 415)
        assert "empty body" in _one_line_error(httpx.post(url, timeout=30), 400)
        assert "over the limit" in _one_line_error(
            httpx.post(url, content=bytes(2_000_000), timeout=30), 413)

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            for _ in range(40):
                yield bytes(50_000)

        assert "over the limit" in _one_line_error(httpx.post(url, content=chunks(),
                                                              timeout=30), 413)
        assert "format=" in _one_line_error(_post(base, clips["c0"], "xml"), 400)
        _one_line_error(httpx.get(url, timeout=30), 405)
        _one_line_error(httpx.get(f"{base}/nowhere", timeout=30), 404)
        assert httpx.get(f"{base}/healthz", timeout=10).json() == {"status": "ok"}
        r = _post(base, clips["c1"], "tsv")  # still serving, and correctly
        assert r.status_code == 200 and r.text == _cli_notes(clips["c1"], tmp_path)


def test_full_queue_is_503_and_sigterm_drains(tmp_path):
    long = tmp_path / "long.wav"
    sf.write(long, np.tile(struck_tones(20, 3), 3), RATE, subtype="PCM_16")  # 60 s
    with serve("--max-queue", "1", "--batch", "1") as (base, proc):
        results: dict[str, httpx.Response] = {}
        first = threading.Thread(target=lambda: results.setdefault("long", _post(base, long)))
        first.start()
        deadline = time.monotonic() + 60
        while _metric(base, "pianolm_queue_depth") < 1:
            assert time.monotonic() < deadline and first.is_alive()
            time.sleep(0.05)
        busy = _post(base, long)
        assert "busy" in _one_line_error(busy, 503) and busy.headers["retry-after"] == "1"
        proc.send_signal(signal.SIGTERM)  # the long request is still in flight
        first.join(timeout=120)
        assert results["long"].status_code == 200 and len(results["long"].json()["notes"]) > 0
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):  # and nothing listens any more
            httpx.get(f"{base}/healthz", timeout=5)


def test_lm_path_on_the_tiny_export(exported, clips, tmp_path):
    model = str(exported.dirs["hier"])
    chosen = [clips[k] for k in ("c0", "c2", "c4", "c5")]
    with serve("--model", model, "--decoder", "lm", "--batch", "4", "--max-wait-ms", "50") \
            as (base, _):
        serial = [_post(base, p, "tsv").text for p in chosen]
        with ThreadPoolExecutor(len(chosen)) as pool:
            together = [r.text for r in pool.map(lambda p: _post(base, p, "tsv"), chosen)]
        assert together == serial
        for path, tsv in zip(chosen, serial):
            assert tsv == _cli_notes(path, tmp_path, "--model", model, "--decoder", "lm")
        assert json.loads(httpx.get(f"{base}/readyz", timeout=10).text)["model"]["decoder"] \
            == "lm"


def test_serve_without_its_extra_or_on_a_busy_port_is_one_line(tmp_path):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        r = subprocess.run([sys.executable, "-m", "pianolm.runtime.cli", "serve", "--port",
                            port], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot listen there" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    blocker = tmp_path / "sitecustomize.py"  # fastapi absent, as on a plain install
    blocker.write_text("import sys\nsys.modules['fastapi'] = None\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-m", "pianolm.runtime.cli", "serve", "--port", "0"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "pip install 'pianolm[serve]'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_imported_kong_model_serves_its_notes_and_pedals(kong_model, clips, tmp_path):
    """A rolls-only model from `pianolm import kong`: the server gives what the CLI writes,
    pedals (CC64, TSV rows, JSON) included, alone or in shared batches."""
    from pianolm.runtime.midi import read_midi_with_pedal

    model = str(kong_model[1])
    chosen = [clips[k] for k in ("c0", "c4", "c6")]
    with serve("--model", model, "--batch", "4", "--max-wait-ms", "50") as (base, _):
        serial = [_post(base, p, "tsv").text for p in chosen]
        with ThreadPoolExecutor(len(chosen)) as pool:
            together = [r.text for r in pool.map(lambda p: _post(base, p, "tsv"), chosen)]
        assert all(close_tables(a, b) for a, b in zip(together, serial))
        for path, tsv in zip(chosen, serial):
            assert close_tables(tsv, _cli_notes(path, tmp_path, "--model", model))
        midi = tmp_path / "served.mid"
        midi.write_bytes(_post(base, chosen[2], "midi").content)
        notes, pedals = read_midi_with_pedal(midi)
        rows = table_rows(serial[2])
        assert len(notes) == sum(r[2] != "pedal" for r in rows) > 0
        assert len(pedals) == sum(r[2] == "pedal" for r in rows) > 0
        body = _post(base, chosen[2]).json()
        assert body["model"]["decoder"] == "rolls" and len(body["pedals"]) == len(pedals)
