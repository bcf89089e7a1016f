"""`pianolm serve`: an HTTP transcription server (FastAPI + uvicorn, the `serve` extra).

    POST /v1/transcribe[?format=midi|json|tsv][&sustain=sounding|key]
                    body: the audio file, or a multipart `file`
    GET  /healthz   the process answers           GET /readyz   model loaded, batcher running
    GET  /metrics   Prometheus text format
    WS   /v1/stream live transcription: PCM in, note events out (runtime/stream_server.py)
    GET  /          a page that streams a file or the microphone and draws the notes live

Every request's segments go through one SegmentBatcher (runtime/batcher.py), so concurrent
requests share decoder batches; the notes are those `pianolm transcribe` writes for the same
file, model, decoder and --sustain (runtime/sustain.py; default sounding). Errors are JSON
`{"error": "<one line>"}`: 400 bad audio or a sustain the model cannot give, 415 a format
nobody reads, 413 a body over the limit (checked as it arrives, before any decoding), 503 a full
queue (with Retry-After), 500 a decode failure of that request alone. README "Serve".
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException

from .audio import AudioError
from .batcher import BatchRecord, DecodeFailed, QueueFull, SegmentBatcher
from .errors import one_line
from .manifest import ManifestError, model_sha256
from .midi import write_midi, write_notes_tsv
from .stream_server import StreamLimits, add_stream_route
from .sustain import SustainError, check_sustain
from .transcriber import Transcriber, Transcription, open_backend

FORMATS = {"midi": "audio/midi", "json": "application/json",
           "tsv": "text/tab-separated-values; charset=utf-8"}
RETRY_AFTER_S = 1
RAW_BODY = "body"  # the spooled file of a raw (not multipart) body
_DISCONNECT_POLL_S = 0.1
WEB_PAGE = Path(__file__).parent / "web" / "index.html"  # GET /


@dataclass(frozen=True)
class ServeConfig:
    """The server's limits (CLI flags of `pianolm serve`)."""

    max_wait_ms: float = 10.0  # a short batch waits this long for more requests
    max_queue: int = 64  # requests admitted at once; more get 503
    max_body_mb: float = 100.0  # larger bodies get 413
    streams: StreamLimits = StreamLimits()  # WS /v1/stream


class _BodyTooLarge(Exception):
    pass


class Metrics:
    """The Prometheus series, in a registry of their own (one server per process, tests too)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pianolm_requests", "requests answered, by HTTP status",
                                ["status"], registry=r)
        self.queue = Gauge("pianolm_queue_depth", "requests in the batcher", registry=r)
        self.batch_rows = Histogram("pianolm_batch_rows", "segments per decoded batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.audio = Counter("pianolm_audio_seconds", "audio seconds transcribed", registry=r)
        seconds = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.latency = Histogram("pianolm_latency_seconds", "seconds per stage: request (end "
                                 "to end), queue (admitted to first batch), batch, encoder, "
                                 "and each decoder stage per batch", ["stage"],
                                 buckets=seconds, registry=r)

    def on_batch(self, record: BatchRecord) -> None:
        self.batch_rows.observe(record.rows)
        self.latency.labels("batch").observe(record.seconds)
        timings = record.timings
        if timings.encoder:
            self.latency.labels("encoder").observe(sum(t for _, t in timings.encoder))
        for name, times in timings.stages.items():
            spent = sum(times.cross_kv) + sum(times.prefill) + sum(t for *_, t in times.steps)
            self.latency.labels(name).observe(spent)


def create_app(transcriber: Transcriber, config: ServeConfig = ServeConfig()) -> FastAPI:
    """The ASGI app over one Transcriber (its `batch` is the batcher's rows per batch)."""
    metrics = Metrics()
    manifest = getattr(transcriber.backend, "manifest", None)
    folder = getattr(manifest, "folder", None)  # None: a backend without a model folder
    model_info = {"sha256": folder and model_sha256(folder), "precision": transcriber.precision,
                  "decoder": transcriber.decoder, "backend": transcriber.backend_name}
    state: dict[str, SegmentBatcher] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["batcher"] = SegmentBatcher(transcriber, config.max_wait_ms / 1000,
                                          config.max_queue, on_batch=metrics.on_batch)
        yield
        # uvicorn has stopped accepting and finished the requests in flight (SIGTERM drain)
        await asyncio.to_thread(state["batcher"].stop)

    app = FastAPI(title="pianolm", lifespan=lifespan, docs_url=None, redoc_url=None)

    def stream_backend():  # live streams read rolls on the CPU, whatever serves the requests
        if folder is None:
            raise ManifestError("its backend has no model folder to open for streaming")
        return open_backend("cpu", folder, transcriber.threads, decoder="rolls")

    add_stream_route(app, config.streams, stream_backend)

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        metrics.requests.labels(str(status)).inc()
        return JSONResponse({"error": one_line(message)}, status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))  # 404, 405: one line too

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(WEB_PAGE, media_type="text/html; charset=utf-8")

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        batcher = state.get("batcher")
        if batcher is None or not batcher.alive:
            return JSONResponse({"status": "not ready"}, 503)
        return JSONResponse({"status": "ready", "model": model_info})

    @app.get("/metrics")
    async def prometheus() -> Response:
        batcher = state.get("batcher")
        metrics.queue.set(batcher.depth if batcher else 0)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/transcribe")
    async def transcribe(request: Request) -> Response:
        t0 = time.perf_counter()
        fmt = request.query_params.get("format", "midi")
        if fmt not in FORMATS:
            return error(400, f"format={fmt}: choose one of {', '.join(FORMATS)}")
        sustain = request.query_params.get("sustain")  # None: the transcriber's, sounding
        if sustain is not None:
            try:  # before the body is read: a choice this model cannot give costs nothing
                check_sustain(transcriber.offsets, sustain)
            except SustainError as e:
                return error(400, str(e))
        limit = int(config.max_body_mb * 1e6)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return error(413, f"body of {int(declared)} bytes is over the limit of {limit} "
                              f"(--max-body-mb {config.max_body_mb:g})")
        folder = Path(tempfile.mkdtemp(prefix="pianolm-serve-"))
        try:
            try:
                audio = await _receive_audio(request, folder, limit)
            except _BodyTooLarge:
                return error(413, f"body is over the limit of {limit} bytes (--max-body-mb "
                                  f"{config.max_body_mb:g})")
            if audio is None:
                return error(400, "empty body: send the audio file's bytes, or a multipart "
                                  "form with a `file` field")
            name = "request body" if audio.name == RAW_BODY else audio.name
            try:
                job = await asyncio.to_thread(state["batcher"].submit, str(audio), name,
                                              sustain)
            except QueueFull as e:
                return error(503, f"busy: {e}", {"Retry-After": str(RETRY_AFTER_S)})
            except AudioError as e:
                return error(415 if e.unsupported else 400, f"{name}: {e.problem}")
            try:
                result = await _unless_disconnected(request, asyncio.wrap_future(job.future),
                                                    job.cancel)
            except AudioError as e:
                return error(400, f"{name}: {e.problem}")
            except DecodeFailed as e:
                return error(500, str(e))
            if result is None:  # the client left; nobody reads this
                return error(499, "client closed the request")
            metrics.audio.inc(result.duration_s)
            wall = time.perf_counter() - t0
            metrics.latency.labels("request").observe(wall)
            metrics.latency.labels("queue").observe(job.queued_s)
            metrics.requests.labels("200").inc()
            timings = {"wall_s": round(wall, 4), "queued_s": round(job.queued_s, 4)}
            return Response(_render(result, fmt, folder, model_info, timings),
                            media_type=FORMATS[fmt])
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    return app


class _Server(uvicorn.Server):
    """uvicorn's server, exiting 0 after a SIGTERM / SIGINT drain: uvicorn itself re-raises
    the signal once it has shut down, so the process would end killed by it (status -15)."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT,
                                                                    signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def run(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serve `app` on a bound socket until SIGTERM / Ctrl-C: then stop accepting, finish the
    requests in flight, stop the batcher, return."""
    _Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])


async def _receive_audio(request: Request, folder: Path, limit: int) -> Path | None:
    """Spool the request's audio into `folder` (a multipart `file` field, else the raw body),
    counting bytes as they arrive: _BodyTooLarge past `limit`. None for an empty body."""
    received = 0

    async def receive() -> dict:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _BodyTooLarge
        return message

    counted = Request(request.scope, receive)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await counted.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            return None
        path = folder / (Path(upload.filename or "upload").name or "upload")
        with path.open("wb") as out:
            shutil.copyfileobj(upload.file, out)
        await form.close()
    else:
        path = folder / RAW_BODY
        with path.open("wb") as out:
            async for chunk in counted.stream():
                out.write(chunk)
    return path if path.stat().st_size else None


async def _unless_disconnected(request: Request, result: Awaitable[Transcription],
                               on_disconnect: Callable[[], None]) -> Transcription | None:
    """Await the job; if the client disconnects first, cancel it (no more work) and None."""
    task = asyncio.ensure_future(result)
    while True:
        done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
        if done:
            try:
                return task.result()
            except asyncio.CancelledError:
                return None
        if await request.is_disconnected():
            on_disconnect()
            return None


def _render(result: Transcription, fmt: str, folder: Path, model: dict, timings: dict
            ) -> bytes:
    """The response body: MIDI, JSON, or the notes TSV (the CLI's writers, so identical)."""
    if fmt == "json":
        import json

        notes = [{"onset": n.onset, "offset": n.offset, "pitch": n.pitch,
                  "velocity": n.velocity} for n in result.notes]
        pedals = [{"onset": down, "offset": up} for down, up in result.pedals]
        return json.dumps({"notes": notes, "pedals": pedals, "duration_s": result.duration_s,
                           "model": model, "timings": timings}).encode()
    path = folder / f"out.{fmt}"
    (write_midi if fmt == "midi" else write_notes_tsv)(result.notes, path,
                                                        pedals=result.pedals)
    return path.read_bytes()
