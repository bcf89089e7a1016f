"""The live page `pianolm serve` serves at / (runtime/web/index.html), in a real headless
browser: Debian's chromium, driven through its DevTools protocol over a WebSocket. The page
picks the committed piano clip, streams it to WS /v1/stream at its own pace, draws the notes,
and builds the MIDI download; its notes are the offline roll transcription's, near enough
(the browser decodes and resamples the file itself).

    PIANOLM_PAGE_SCREENSHOT=docs/live-page.png python -m pytest tests/test_web_page.py

also writes the page's screenshot (docs/streaming.md shows it)."""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="pianolm serve needs the serve extra")
pytest.importorskip("websockets", reason="WS /v1/stream needs the serve extra")
httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (the dev extra)")

from websockets.sync.client import connect  # noqa: E402

from pianolm.runtime.metrics import evaluate  # noqa: E402
from pianolm.runtime.midi import read_midi  # noqa: E402
from pianolm.runtime.notes import Note  # noqa: E402
from pianolm.runtime.transcriber import Transcriber  # noqa: E402
from tests.piece import CLIP  # noqa: E402
from tests.test_serve import serve  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One browser tab over the DevTools protocol: send a command, get its result."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    def __call__(self, method: str, **params) -> dict:
        key = next(self.ids)
        self.ws.send(json.dumps({"id": key, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("id") == key:
                assert "error" not in reply, reply
                return reply["result"]

    def js(self, expression: str):
        result = self("Runtime.evaluate", expression=expression, awaitPromise=True,
                      returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")


@pytest.fixture()
def browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (bash scripts/install_browser.sh)")
    proc = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
                             "--remote-debugging-port=0", f"--user-data-dir={tmp_path}",
                             "--window-size=1200,640", "about:blank"],
                            stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            match = re.search(r"ws://127\.0\.0\.1:(\d+)/", proc.stderr.readline())
            port = match and int(match.group(1))
        assert port, "chromium did not start its DevTools endpoint"
        yield port
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_the_page_streams_a_file_and_draws_its_notes(browser, tmp_path):
    with serve("--decoder", "rolls", "--threads", "1") as (base, _):
        assert "pianolm live" in httpx.get(f"{base}/", timeout=10).text
        tab = httpx.put(f"http://127.0.0.1:{browser}/json/new?{base}/", timeout=30).json()
        with connect(tab["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
            page = Page(ws)
            page("Page.enable")
            page("DOM.enable")
            deadline = time.monotonic() + 30
            while page.js("document.readyState") != "complete" and time.monotonic() < deadline:
                time.sleep(0.1)
            root = page("DOM.getDocument")["root"]["nodeId"]
            node = page("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
            page("DOM.setFileInputFiles", nodeId=node, files=[str(CLIP.resolve())])
            page.js("document.getElementById('play').click()")
            deadline = time.monotonic() + 120  # the clip plays at its own pace
            while not page.js("window.pianolm.done") and time.monotonic() < deadline:
                time.sleep(0.5)
            assert page.js("window.pianolm.done"), "the stream never ended"
            streamed = [Note(n["onset"], n["offset"], n["pitch"], n["velocity"])
                        for n in page.js("JSON.parse(JSON.stringify(window.pianolm.notes))")]
            offline = Transcriber(decoder="rolls", threads=1).transcribe(str(CLIP)).notes
            assert len(offline) >= 20
            assert evaluate(streamed, offline)["onset_f"] >= 0.9
            # the MIDI download holds the same notes
            data = page.js("midiFile().arrayBuffer().then(b => Array.from(new Uint8Array(b)))")
            (tmp_path / "live.mid").write_bytes(bytes(data))
            midi = read_midi(tmp_path / "live.mid")
            assert [n.pitch for n in midi] == [n.pitch for n in sorted(
                streamed, key=lambda n: (round(n.onset * 960), n.pitch))]
            shot = os.environ.get("PIANOLM_PAGE_SCREENSHOT")
            if shot:
                png = page("Page.captureScreenshot", format="png")["data"]
                Path(shot).write_bytes(base64.b64decode(png))

