"""`WS /v1/stream` on a real `pianolm serve` (runtime/stream_server.py), with a real WebSocket
client (websockets, part of the serve extra): the events equal `pianolm stream`'s for the same
PCM; each limit and bad message ends that stream with one line and a close code, a stream
beyond --max-streams is refused with 503, and the server keeps serving."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.struck_tones import struck_tones

pytest.importorskip("fastapi", reason="pianolm serve needs the serve extra")
httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (the dev extra)")
websockets = pytest.importorskip("websockets", reason="WS /v1/stream needs the serve extra")

from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from tests.test_serve import serve  # noqa: E402

RATE = 16000


@pytest.fixture(scope="module")
def pcm() -> bytes:
    """12 s of struck tones, 16 kHz mono s16le."""
    audio = struck_tones(12.0, 3, harmonics=(1, 2, 3), every_s=0.45)
    return np.round(np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def _cli_events(pcm: bytes) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "pianolm.runtime.cli", "stream", "-",
                           "--threads", "1"], input=pcm, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    return [json.loads(line) for line in proc.stdout.decode().splitlines()]


def _strip(events: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "emitted_at"} for e in events]


def _ws(base: str, query: str = "") -> str:
    return base.replace("http://", "ws://") + "/v1/stream" + query


def _stream(url: str, pcm: bytes, first: str | None = None, frame: int = 3200) -> list[dict]:
    """Send `first` (a text message), the PCM in frames, then "end"; every message back."""
    with connect(url, open_timeout=60, close_timeout=10) as ws:
        if first is not None:
            ws.send(first)
        for i in range(0, len(pcm), frame):
            ws.send(pcm[i:i + frame])
        ws.send("end")
        messages = [json.loads(m) for m in ws]  # until the server closes
    return messages


def _closed_with(ws, code: int) -> str:
    """The stream's last message (one line of error) and its close code."""
    last = None
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            last = ws.recv(timeout=30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == code
    error = json.loads(last)["error"]
    assert "\n" not in error and "Traceback" not in error
    return error


def test_ws_stream_gives_the_cli_events_and_keeps_serving(pcm):
    with serve("--decoder", "rolls", "--threads", "1", "--stream-idle-s", "1",
               "--max-frame-kb", "16") as (base, _):
        events = _stream(_ws(base), pcm)
        assert events[-1] == {"type": "end"}
        assert _strip(events[:-1]) == _strip(_cli_events(pcm))
        assert {e["type"] for e in events[:-1]} == {"note_on", "note_off"}
        # the format as the first text message: the same audio as f32le at 8 kHz stereo
        x = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768
        stereo = np.repeat(x[::2, None], 2, axis=1).astype("<f4").tobytes()
        first = json.dumps({"rate": 8000, "channels": 2, "format": "f32le"})
        resampled = _stream(_ws(base), stereo, first=first, frame=6400)
        assert resampled[-1] == {"type": "end"} and len(resampled) > 10

        # bad input: one line, a close code, and the server goes on
        with connect(_ws(base)) as ws:
            ws.send(b"\0" * 20000)
            assert "over the limit" in _closed_with(ws, 1009)
        with connect(_ws(base)) as ws:
            ws.send(pcm[:3200])
            assert "no message for 1 s" in _closed_with(ws, 1008)
        with connect(_ws(base)) as ws:
            ws.send(pcm[:3200])
            ws.send("{\"rate\": 8000}")
            assert "text after the audio began" in _closed_with(ws, 1007)
        with connect(_ws(base)) as ws:
            ws.send("not json")
            assert "JSON object" in _closed_with(ws, 1003)
        with pytest.raises(InvalidStatus) as refused:
            connect(_ws(base, "?format=u8"), open_timeout=30)
        assert refused.value.response.status_code == 400
        assert "sample format 'u8'" in json.loads(refused.value.response.body)["error"]
        assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200


def test_streams_beyond_the_limit_get_503(pcm):
    with serve("--decoder", "rolls", "--threads", "1", "--max-streams", "1") as (base, _):
        with connect(_ws(base)) as first:
            first.send(pcm[:3200])
            with pytest.raises(InvalidStatus) as refused:
                connect(_ws(base), open_timeout=30)
            response = refused.value.response
            assert response.status_code == 503 and response.headers["Retry-After"] == "1"
            assert "busy" in json.loads(response.body)["error"]
        # the first stream left without "end": its slot is free again
        events = _stream(_ws(base), pcm[:RATE * 2 * 4])
        assert events[-1] == {"type": "end"}
