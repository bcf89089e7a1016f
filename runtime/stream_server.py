"""`WS /v1/stream` on `pianolm serve`: live transcription over a WebSocket.

    ws://HOST:PORT/v1/stream[?rate=44100&channels=2&format=s16le]
    -> binary messages: raw interleaved PCM, any sizes
    -> text {"rate": 44100, "channels": 2, "format": "f32le"}: the PCM format, as the first
       message instead of the query (default: 16 kHz mono s16le)
    -> text "end" (or {"type": "end"}): end of input
    <- text: the events `pianolm stream` prints (note_on, note_off, pedal_on, pedal_off; one
       JSON object each, emitted_at counted from the first audio), then {"type": "end"} and a
       normal close once the input has ended and every note is closed.

Limits (ServeConfig): a stream beyond max_streams is refused before the handshake with HTTP
503 and Retry-After; a message over max_frame_kb, no message for idle_s, or a malformed
message ends the stream with {"error": "<one line>"} and a close code (1009, 1008, 1003 or
1007). A client that disconnects just frees its slot. Each stream has its own
StreamTranscriber (runtime/stream.py) on one shared ONNX Runtime CPU backend, opened for the
rolls at the first stream; encoder windows run in worker threads, one stream's after
another's as they arrive, not batched together.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from .backend import RollBackend
from .errors import one_line
from .manifest import ManifestError
from .stream import (
    DEFAULT_HOP_S,
    DEFAULT_LOOKAHEAD_S,
    DEFAULT_WINDOW_S,
    PcmDecoder,
    StreamTranscriber,
)

END = "end"
# close codes (RFC 6455): unsupported data, policy (idle), too big, inconsistent data
UNSUPPORTED, POLICY, TOO_BIG, INVALID = 1003, 1008, 1009, 1007


@dataclass(frozen=True)
class StreamLimits:
    max_streams: int = 4
    max_frame_kb: float = 256.0
    idle_s: float = 10.0
    hop_s: float = DEFAULT_HOP_S
    lookahead_s: float = DEFAULT_LOOKAHEAD_S
    window_s: float | None = DEFAULT_WINDOW_S


class StreamError(Exception):
    """Ends a stream: its one-line message goes to the client, then this close code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def pcm_format(fields: Mapping[str, str | int]) -> PcmDecoder:
    """The PCM format from query fields or the first text message: rate, channels, format."""
    try:
        rate, channels = int(fields.get("rate", 16000)), int(fields.get("channels", 1))
    except (TypeError, ValueError):
        raise StreamError("rate and channels must be integers", UNSUPPORTED) from None
    try:
        return PcmDecoder(rate, channels, str(fields.get("format", "s16le")))
    except ValueError as e:
        raise StreamError(str(e), UNSUPPORTED) from None


def add_stream_route(app: FastAPI, limits: StreamLimits,
                     open_backend: Callable[[], RollBackend]) -> None:
    """Mount WS /v1/stream on `app`; `open_backend` is called once, at the first stream."""
    slots = threading.BoundedSemaphore(limits.max_streams)
    backend: list[RollBackend] = []
    lock = asyncio.Lock()

    async def shared_backend() -> RollBackend:
        async with lock:
            if not backend:
                backend.append(await asyncio.to_thread(open_backend))
        return backend[0]

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket) -> None:
        if not slots.acquire(blocking=False):
            await ws.send_denial_response(JSONResponse(
                {"error": f"busy: {limits.max_streams} streams already (--max-streams)"}, 503,
                headers={"Retry-After": "1"}))
            return
        try:
            await _serve(ws, limits, shared_backend)
        finally:
            slots.release()


async def _serve(ws: WebSocket, limits: StreamLimits, backend: Callable) -> None:
    # refused before the handshake, as HTTP: a bad format in the query, a model without rolls
    query = ws.query_params
    try:
        given = any(k in query for k in ("rate", "channels", "format"))
        pcm = pcm_format(query) if given else None
        # in a worker thread: a window shorter than a segment costs one probe encoder pass
        transcriber = await asyncio.to_thread(StreamTranscriber, await backend(), limits.hop_s,
                                              limits.lookahead_s, window_s=limits.window_s)
    except StreamError as e:
        await ws.send_denial_response(JSONResponse({"error": one_line(str(e))}, 400))
        return
    except (ManifestError, OSError, ValueError) as e:
        await ws.send_denial_response(JSONResponse(
            {"error": f"this server cannot stream: {one_line(str(e))}"}, 501))
        return
    await ws.accept()
    try:
        while True:
            data, text = await _receive(ws, limits)
            if data is not None:
                pcm = pcm or pcm_format({})
                await _send(ws, await asyncio.to_thread(transcriber.push, pcm.push(data)))
            elif _is_end(text):
                tail = pcm.finish() if pcm else None
                if tail is not None and tail.size:
                    await _send(ws, await asyncio.to_thread(transcriber.push, tail))
                await _send(ws, await asyncio.to_thread(transcriber.finish))
                await ws.send_text(json.dumps({"type": END}))
                await ws.close()
                return
            elif pcm is None:
                pcm = pcm_format(_json_object(text))
            else:
                raise StreamError("text after the audio began: send binary PCM, or \"end\"",
                                  INVALID)
    except StreamError as e:
        await ws.send_text(json.dumps({"error": one_line(str(e))}))
        await ws.close(e.code)
    except WebSocketDisconnect:
        pass  # the client left: nobody to tell
    except ValueError as e:  # e.g. NaN samples: the stream's own one-line complaint
        await ws.send_text(json.dumps({"error": one_line(str(e))}))
        await ws.close(INVALID)


async def _receive(ws: WebSocket, limits: StreamLimits) -> tuple[bytes | None, str | None]:
    try:
        message = await asyncio.wait_for(ws.receive(), limits.idle_s)
    except TimeoutError:
        raise StreamError(f"no message for {limits.idle_s:g} s: closed", POLICY) from None
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    data, text = message.get("bytes"), message.get("text")
    size = len(data) if data is not None else len((text or "").encode())
    if size > limits.max_frame_kb * 1000:
        raise StreamError(f"a message of {size} bytes is over the limit of "
                          f"{limits.max_frame_kb:g} kB", TOO_BIG)
    return data, text


def _is_end(text: str | None) -> bool:
    if text is None:
        return False
    if text.strip() == END:
        return True
    try:
        return json.loads(text) == {"type": END}
    except ValueError:
        return False


def _json_object(text: str | None) -> dict:
    try:
        fields = json.loads(text or "")
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        raise StreamError("the first text message must be a JSON object: {\"rate\": ..., "
                          "\"channels\": ..., \"format\": \"s16le\"|\"f32le\"}", UNSUPPORTED)
    return fields


async def _send(ws: WebSocket, events: list) -> None:
    for event in events:
        await ws.send_text(json.dumps(event.to_json()))
