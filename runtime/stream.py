"""Live transcription: PCM chunks in, note events out, while the piano is still playing.

    st = StreamTranscriber(backend)            # a backend with roll outputs (decoder "rolls")
    for chunk in chunks:                       # float32 mono 16 kHz, any chunk sizes
        for event in st.push(chunk):
            print(event.to_json())
    for event in st.finish():                  # end of input: the rest, open notes closed
        ...

Windows. The encoder is run on windows of W seconds (DEFAULT_WINDOW_S by default; at most
the model's segment, 10 s: a pass costs about in proportion to W) that slide over the stream by
a hop H; each window has a right context (lookahead) R and a left context C = W - H - R. Window
k commits the frames [k H, (k + 1) H) of the timeline: those that no later window will see with
more context on both sides. It can run once the audio reaches (k + 1) H + R, so a frame is
committed between R and H + R seconds after it was played (plus the encoder's time, and the
peak radius of the roll decoder). Windows before the stream's start are padded with silence on
the left, so the first notes wait no longer than later ones. At the end of input one last
window, aligned to the audio's end as the offline transcriber's last segment is, commits the
frames left. benchmarks/stream_latency.py measures latency against F1 per geometry.

Notes. The committed frames go into a RollStream (runtime/rolls.py): the offline roll
decoder's own rules, fed a piece at a time. A note_on is emitted once its onset frame is
decided, a note_off once its end is; so note_on events come in onset order, and a note_off
can come after note_ons later than its offset (a note ending at an offset peak is decided
when its frame roll falls, a little later). Every note_on is closed by a note_off of the same
pitch, at the latest by finish(). A model with sustain-pedal rolls also gives pedal_on /
pedal_off (PedalStream: Kong's pedal rules, as the offline transcriber reads them).

Level. A model trained on peak-normalised files (manifest audio.input_peak) is fed the stream
scaled by the loudest sample heard so far (at least MIN_PEAK), so once the stream's peak has
been heard the scaling is the offline transcriber's.

Memory is flat: the last W seconds of audio and a few frames of note rolls are kept, whatever
the stream's length (the pedal rolls since the last press ended: a pedal held for minutes is
the one exception); the notes are handed out, not kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

# audio.py's block decoder, mix-down and resampler: one audio path for files and streams
from .audio import SAMPLE_RATE, To16k, iter_file_16k, mix_to_mono, probe_audio
from .backend import RollBackend
from .errors import one_line
from .kong_rolls import OFFSET_NEIGHBOUR, pedal_presses
from .manifest import Manifest, ManifestError
from .notes import Note, Pedal
from .rolls import PEDAL_KEYS, ROLL_KEYS, RollDecodeConfig, RollStream
from .sustain import SOUNDING, offsets_of

# The default geometry, chosen from the latency / F1 curve (benchmarks/stream_latency.py,
# benchmarks/results/stream_latency_cpu.json): a 1.5 s encoder window every 0.2 s with 0.3 s of
# right context, under half of one core for the shipped model
DEFAULT_WINDOW_S = 1.5
DEFAULT_HOP_S = 0.2
DEFAULT_LOOKAHEAD_S = 0.3
MIN_PEAK = 0.05  # the quietest peak scaled up to input_peak: silence is not amplified to noise


@dataclass(frozen=True)
class Event:
    """One output event. time: seconds of audio (the onset of a note_on, the offset of a
    note_off); emitted_at: wall-clock seconds since the stream's first sample was read."""

    kind: str
    time: float
    pitch: int | None  # None for the pedal
    velocity: int | None  # note_on only
    emitted_at: float

    def to_json(self) -> dict:
        """The JSONL line's fields: note_on {onset, pitch, velocity}, note_off {offset,
        pitch}, pedal_on {onset}, pedal_off {offset}, all with emitted_at; times rounded to
        0.1 ms."""
        out: dict = {"type": self.kind}
        if self.kind.endswith("_on"):
            out["onset"] = round(self.time, 4)
        else:
            out["offset"] = round(self.time, 4)
        if self.pitch is not None:
            out["pitch"] = self.pitch
        if self.velocity is not None:
            out["velocity"] = self.velocity
        out["emitted_at"] = round(self.emitted_at, 4)
        return out


class Performance:
    """The notes and pedal presses a stream's events make: each note_on (pedal_on) paired
    with the note_off (pedal_off) that closes it. Every note_on is closed by the end of a
    stream, so after finish() this is the whole performance."""

    def __init__(self) -> None:
        self.notes: list[Note] = []
        self.pedals: list[Pedal] = []
        self._sounding: dict[int | None, Event] = {}  # by pitch; None: the pedal

    def add(self, event: Event) -> None:
        if event.kind.endswith("_on"):
            self._sounding[event.pitch] = event
            return
        on = self._sounding.pop(event.pitch)
        if event.pitch is None:
            self.pedals.append((on.time, event.time))
        else:
            self.notes.append(Note(on.time, event.time, event.pitch, on.velocity or 1))


def _order(event: Event) -> tuple[float, bool, int]:
    # at one time a note_off comes before a re-strike's note_on, a pedal_off before a pedal_on
    return event.time, event.kind.endswith("_on"), -1 if event.pitch is None else event.pitch


class PedalStream:
    """Kong's sustain-pedal decoding (runtime/kong_rolls.py pedal_presses, what the offline
    transcriber reads from whole rolls) over rolls that arrive a piece at a time.

    A pedal_on is sent as soon as a press's first frame is known; its pedal_off once no later
    frame can change where it ends (an offset peak needs OFFSET_NEIGHBOUR frames after it).
    The presses equal the offline ones, except that a press still down at the end is closed
    there (Kong drops it; a live listener has already heard its pedal_on). Only the frames
    since the last press ended are kept.
    """

    def __init__(self, frames_per_second: float, config: RollDecodeConfig) -> None:
        self.fps = float(frames_per_second)
        self.cfg = config
        self._buf = {k: np.zeros(0, np.float32) for k in ("pedal_offset", "pedal_frame")}
        self._base = 0  # the buffer's first frame
        self._after = 0  # the next press begins after this frame
        self._down = False  # a pedal_on was sent for the press now open

    def push(self, rolls: dict[str, np.ndarray]) -> list[tuple[str, float]]:
        """Append frames {pedal_offset, pedal_frame: [t] or [t, 1]}; the (kind, seconds)
        events now decided."""
        for key, buf in self._buf.items():
            self._buf[key] = np.concatenate([buf, np.asarray(rolls[key], np.float32)
                                             .reshape(-1)])
        return self._decide(final=False)

    def finish(self) -> list[tuple[str, float]]:
        return self._decide(final=True)

    def _decide(self, final: bool) -> list[tuple[str, float]]:
        b0, t = self._base, len(self._buf["pedal_frame"])
        events: list[tuple[str, float]] = []
        for press in pedal_presses(self._buf, self.cfg, after=self._after - b0):
            if not self._down:
                events.append(("pedal_on", (b0 + press.bgn) / self.fps))
                self._down = True
            if press.fin is None or press.closed is None or (
                    not final and press.closed >= t - OFFSET_NEIGHBOUR):
                if final:  # still down at the end of the stream
                    events.append(("pedal_off", max(b0 + t - 1, b0 + press.bgn) / self.fps))
                    self._down = False
                break
            events.append(("pedal_off", max(b0 + press.fin + press.shift, b0 + press.bgn)
                           / self.fps))
            self._down = False
            self._after = b0 + press.closed
        # the frames a press after `after` reads: its rise's frame before, the offset
        # peaks' neighbours
        keep = max(self._after - OFFSET_NEIGHBOUR - 1, b0)
        self._buf = {k: v[keep - b0:] for k, v in self._buf.items()}
        self._base = keep
        return events


@dataclass(frozen=True)
class Windows:
    """The sliding-window plan in encoder frames: hop, lookahead, left context, window."""

    hop: int
    lookahead: int
    context: int
    window: int  # frames a segment spans (frames_per_segment - 1: its last is the next's 0th)
    frame_samples: int  # 16 kHz samples per frame

    @classmethod
    def plan(cls, manifest: Manifest, hop_s: float, lookahead_s: float,
             window_s: float | None = None) -> Windows:
        """window_s: the encoder's window (default: the model's segment). A shorter one costs
        less per hop, with less context on the left."""
        fps = manifest.encoder.frames_per_second
        frame_samples = round(SAMPLE_RATE / fps)
        segment = manifest.encoder.frames_per_segment - 1
        if frame_samples * segment != manifest.segment_samples or manifest.sample_rate != \
                SAMPLE_RATE:
            raise ManifestError("streaming needs 16 kHz segments of whole encoder frames")
        given = (hop_s, lookahead_s, segment / fps if window_s is None else window_s)
        if not all(math.isfinite(x) for x in given):
            raise ValueError("hop, lookahead and window must be finite numbers of seconds")
        hop, lookahead, window = (round(x * fps) for x in given)
        if window > segment:
            raise ValueError(f"window {window_s} s: at most the model's segment, "
                             f"{segment / fps:g} s")
        if hop < 1 or lookahead < 0 or hop + lookahead > window:
            raise ValueError(f"hop {hop_s} s and lookahead {lookahead_s} s: need hop >= one "
                             f"frame, lookahead >= 0 and hop + lookahead <= "
                             f"{window / fps:g} s (the window)")
        return cls(hop, lookahead, window - hop - lookahead, window, frame_samples)

    def start(self, k: int) -> int:
        """Window k's first sample (negative: that much silence pads it on the left)."""
        return (k * self.hop - self.context) * self.frame_samples

    def ready(self, k: int) -> int:
        """Samples the stream must hold before window k can run: its end."""
        return self.start(k) + self.window * self.frame_samples


class StreamTranscriber:
    """Sliding-window roll transcription of a live stream (see the module doc).

    backend: a runtime backend whose model's encoder outputs piano rolls (open it with
        transcriber.open_backend(..., decoder="rolls")); the manifest's thresholds decode them.
    clock: wall-clock seconds (time.perf_counter); emitted_at counts from the first push, or
        from mark_start().
    window_s: the encoder's window in seconds (Windows.plan; None: the model's segment).
    """

    def __init__(self, backend: RollBackend, hop_s: float = DEFAULT_HOP_S,
                 lookahead_s: float = DEFAULT_LOOKAHEAD_S,
                 clock: Callable[[], float] = time.perf_counter,
                 window_s: float | None = DEFAULT_WINDOW_S) -> None:
        manifest: Manifest | None = getattr(backend, "manifest", None)
        if manifest is None or manifest.encoder.rolls is None:
            raise ManifestError("streaming needs a model whose encoder outputs piano rolls "
                                "(manifest encoder.rolls)")
        rolls = manifest.encoder.rolls
        if rolls.thresholds.method != "pianolm":
            raise ManifestError(f"streaming decodes rolls with pianolm's rules; this model "
                                f"asks for {rolls.thresholds.method!r} (not built yet)")
        if offsets_of(manifest, "rolls") != SOUNDING:
            raise ManifestError("streaming gives sounding offsets; this model's rolls end "
                                "notes at key releases (not built yet)")
        self.plan = Windows.plan(manifest, hop_s, lookahead_s, window_s)
        self.backend = backend
        if self.plan.window * self.plan.frame_samples < manifest.segment_samples:
            self._probe(window_s)
        self.fps = manifest.encoder.frames_per_second
        self.input_peak = manifest.input_peak
        self.rolls = RollStream(self.fps, rolls.thresholds, track_starts=True)
        self.pedal = PedalStream(self.fps, rolls.thresholds) if rolls.pedal else None
        self._pedal_events: list[tuple[str, float]] = []  # decided, not yet handed out
        self.clock = clock
        self.t0: float | None = None
        self._audio = np.zeros(0, np.float32)  # samples from self._audio0 on
        self._audio0 = 0  # the buffer's first sample, in stream samples
        self._total = 0  # samples pushed
        self._peak = 0.0  # the loudest |sample| of the first self._peaked
        self._peaked = 0
        self._next = 0  # the next window to run
        self._finished = False

    @property
    def seconds(self) -> float:
        """Audio pushed so far, in seconds."""
        return self._total / SAMPLE_RATE

    def mark_start(self) -> None:
        """emitted_at counts from now (call it when the first sample is read)."""
        if self.t0 is None:
            self.t0 = self.clock()

    def push(self, samples: np.ndarray) -> list[Event]:
        """Feed float32 mono 16 kHz samples; the events every window now complete gives."""
        if self._finished:
            raise ValueError("push after finish")
        x = np.asarray(samples, np.float32).reshape(-1)
        self.mark_start()
        if x.size:
            if not np.isfinite(x).all():
                raise ValueError(f"NaN or infinite samples near {self.seconds:.2f} s")
            self._audio = np.concatenate([self._audio, x])
            self._total += x.size
        events: list[Event] = []
        while self.plan.ready(self._next) <= self._total:
            p = self.plan
            self._commit(p.start(self._next), slice(p.context, p.context + p.hop))
            self._next += 1  # only once the window's frames are in: Ctrl-C mid-encode
            events += self._events()
        self._trim()
        return events

    def finish(self) -> list[Event]:
        """End of input: one end-aligned window commits the frames left; every open note is
        closed. Nothing is emitted for a stream that held no samples."""
        if self._finished:
            return []
        self._finished = True
        if self._total == 0:
            return []
        p = self.plan
        done = self._next * p.hop  # frames committed
        frames = self._total // p.frame_samples + 1  # as rolls.kept_frames counts them
        if done < frames:
            # the last window ends with the audio, on a frame boundary (audio.tail_start)
            start = -(-(self._total - p.window * p.frame_samples) // p.frame_samples)
            first = start * p.frame_samples
            self._commit(first, slice(done - start, frames - start))
        ended = self.rolls.finish()
        started, _ = self.rolls.drain()
        if self.pedal is not None:
            self._pedal_events += self.pedal.finish()
        return self._events(started, ended)

    # -- internals

    def _probe(self, window_s: float | None) -> None:
        """Run the encoder once on a silent window of the planned length: an encoder whose
        front end needs more audio than that (e.g. a constant-Q transform's reflect padding)
        is refused now, in one line, not at the first hop."""
        silence = np.zeros((1, self.plan.window * self.plan.frame_samples), np.float32)
        try:
            self.backend.encode_with_rolls(silence, whole=False)
        except Exception as e:  # the backend's own error type (ONNX Runtime's, ...)
            raise ValueError(f"window {window_s} s: this model's encoder cannot run on so "
                             f"short a window ({one_line(e)[:160]})") from None

    def _commit(self, first: int, keep: slice) -> None:
        """Encode the window whose first sample is `first` and push its frames `keep`."""
        p = self.plan
        n = p.window * p.frame_samples
        window = np.zeros(n, np.float32)
        lo, hi = max(first, self._audio0), min(first + n, self._total)
        window[lo - first: hi - first] = self._audio[lo - self._audio0: hi - self._audio0]
        if self.input_peak is not None:
            # the level heard up to the window's end only: the same however the stream is
            # chunked, and no peeking ahead of the audio clock
            if hi > self._peaked:
                fresh = self._audio[self._peaked - self._audio0: hi - self._audio0]
                self._peak = max(self._peak, float(np.max(np.abs(fresh))))
                self._peaked = hi
            window *= np.float32(self.input_peak / max(self._peak, MIN_PEAK))
        if n == self.backend.segment_samples:
            _, rolls = self.backend.encode_with_rolls(window[None])
        else:  # a --window shorter than the model's segment
            _, rolls = self.backend.encode_with_rolls(window[None], whole=False)
        assert rolls is not None
        self.rolls.push({key: rolls[key][0, keep] for key in ROLL_KEYS})
        if self.pedal is not None:
            self._pedal_events += self.pedal.push({key: rolls[key][0, keep]
                                                   for key in PEDAL_KEYS})

    def _events(self, started: list[Note] | None = None, ended: list[Note] | None = None
                ) -> list[Event]:
        if started is None or ended is None:
            started, ended = self.rolls.drain()
        assert self.t0 is not None
        at = self.clock() - self.t0
        events = [Event("note_on", n.onset, n.pitch, n.velocity, at) for n in started]
        events += [Event("note_off", n.offset, n.pitch, None, at) for n in ended]
        events += [Event(kind, t, None, None, at) for kind, t in self._pedal_events]
        self._pedal_events = []
        return sorted(events, key=_order)

    def _trim(self) -> None:
        """Keep the audio the next window or an end-aligned last window can still read."""
        p = self.plan
        keep = min(p.start(self._next), self._total - p.window * p.frame_samples)
        if keep > self._audio0:
            self._audio = self._audio[keep - self._audio0:]
            self._audio0 = keep


# ----------------------------------------------------------------------------- PCM sources

SAMPLE_FORMATS = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}


class PcmDecoder:
    """Raw interleaved PCM bytes, in pieces of any size -> float32 mono 16 kHz samples: the
    same mix-down and resampler (soxr) as runtime/audio.py uses for files. Bytes short of a
    whole frame (one sample of every channel) wait for the next piece; at the end they are
    dropped."""

    def __init__(self, rate: int, channels: int, sample_format: str) -> None:
        if sample_format not in SAMPLE_FORMATS:
            raise ValueError(f"sample format {sample_format!r}: choose from "
                             f"{', '.join(SAMPLE_FORMATS)}")
        if rate < 1 or channels < 1:
            raise ValueError(f"rate {rate} and channels {channels}: both must be positive")
        self.rate, self.channels, self.sample_format = rate, channels, sample_format
        self.dtype = SAMPLE_FORMATS[sample_format]
        self.frame_bytes = self.dtype.itemsize * channels
        self._resampler = To16k(rate)
        self._rest = b""

    def push(self, data: bytes) -> np.ndarray:
        data = self._rest + data
        cut = len(data) - len(data) % self.frame_bytes
        self._rest = data[cut:]
        x = np.frombuffer(data[:cut], self.dtype).reshape(-1, self.channels).astype(np.float32)
        if self.sample_format == "s16le":
            x /= 32768
        return self._resampler.push(mix_to_mono(x))

    def finish(self) -> np.ndarray:
        """The resampler's tail (once, at the very end)."""
        return self._resampler.push(np.zeros(0, np.float32), last=True)


def pcm_chunks(read: Callable[[int], bytes], rate: int, channels: int, sample_format: str,
               block_s: float = 0.1) -> Iterator[np.ndarray]:
    """Raw interleaved PCM from `read(n)` (b"" at the end) -> float32 mono 16 kHz chunks
    (PcmDecoder)."""
    pcm = PcmDecoder(rate, channels, sample_format)
    block = max(1, round(block_s * rate)) * pcm.frame_bytes
    while data := read(block):
        out = pcm.push(data)
        if out.size:
            yield out
    tail = pcm.finish()
    if tail.size:
        yield tail


def file_chunks(path: str, block_s: float = 0.1) -> Iterator[np.ndarray]:
    """An audio file read block by block as float32 mono 16 kHz chunks (audio.py's decoder
    and resampler), never whole: the header is checked now (AudioError)."""
    info = probe_audio(path)
    return iter_file_16k(info.path, max(1, round(block_s * info.sample_rate)))


def paced(chunks: Iterator[np.ndarray], clock: Callable[[], float] = time.perf_counter,
          sleep: Callable[[float], None] = time.sleep) -> Iterator[np.ndarray]:
    """Hand each chunk out no sooner than a live input would: when the audio clock (from the
    first chunk's arrival) reaches the chunk's end."""
    t0: float | None = None
    played = 0
    for chunk in chunks:
        t0 = clock() if t0 is None else t0
        played += chunk.size
        wait = t0 + played / SAMPLE_RATE - clock()
        if wait > 0:
            sleep(wait)
        yield chunk
