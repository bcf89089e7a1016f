"""Audio input: read any WAV/FLAC/OGG, mix to mono, resample to 16 kHz, cut into 10 s segments.

numpy + soundfile + soxr only (never torch). The model's input convention (docs/model.md,
"Audio"): float32 mono at 16 kHz, non-overlapping 10 s segments of 160000 samples.

    samples = load_audio("take.flac")            # float32 [n] at 16 kHz
    for first, batch in iter_segment_batches(samples, batch_size=8):
        ...                                      # batch: float32 [<=8, 160000]

    info = probe_audio("concert.flac")           # header only: rate, channels, length
    for first, batch in batch_segments(stream_segments("concert.flac"), batch_size=8):
        ...                                      # same batches; memory bounded by a few segments

There is one conversion path (`iter_file_16k` for files, `_convert` for arrays, both built on
`mix_to_mono`, `_check_finite` and `To16k`): load_audio is the concatenation of the streamed
chunks, so stream_segments(path) yields exactly the rows of segment_audio(load_audio(path)).
Resampling is always a soxr.ResampleStream ('HQ'); its output does not depend on how the input is
chunked and equals one-shot soxr.resample sample for sample (tests/test_audio.py measures it).

Sample values are kept as they are (no normalisation, no clipping); integer input is scaled
to [-1, 1). Every user error (missing file, unreadable or unsupported file, empty audio,
NaN/inf samples) raises `AudioError` with a one-line message that names the file.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from .errors import one_line
from .vocab import SEGMENT_SECONDS

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
SEGMENT_SAMPLES = int(round(SEGMENT_SECONDS * SAMPLE_RATE))  # 160000
RESAMPLE_QUALITY = "HQ"
_READ_BLOCK_FRAMES = 1 << 18  # frames load_audio reads per block: bounds the multi-channel buffer
_EXACT_HEADERS = {"WAV", "WAVEX", "W64", "RF64", "AIFF", "CAF"}  # frames counted, not estimated
_MAX_CHANNELS = 256  # more "channels" than this in an array is almost surely [channels, n]

__all__ = [
    "SAMPLE_RATE", "SEGMENT_SAMPLES", "AudioError", "AudioInfo", "load_audio", "prepare_audio",
    "probe_audio", "stream_segments", "segments_from_array", "batch_segments",
    "num_segments", "resampled_length", "segment_audio", "iter_segment_batches",
    "normalise_peak", "file_peak", "tail_start", "transcription_segments",
]


class AudioError(Exception):
    """A user-facing audio problem; the message is one line naming the file and the problem.
    unsupported: the file's format was not recognised at all (a server answers 415, not 400)."""

    def __init__(self, source: str, problem: str, unsupported: bool = False):
        self.source = source
        self.problem = one_line(problem)
        self.unsupported = unsupported
        super().__init__(f"{source}: {self.problem}")


# ----------------------------------------------------------------------------- shared pieces


def _checked_path(path: str | os.PathLike) -> str:
    """Reject what libsndfile would report badly (missing, directory, 0 bytes); return the name."""
    name = os.fspath(path)
    if not os.path.exists(name):
        raise AudioError(name, "file not found")
    if os.path.isdir(name):
        raise AudioError(name, "is a directory, not an audio file")
    try:
        size = os.path.getsize(name)
    except OSError as e:
        raise AudioError(name, f"cannot open ({e.strerror or e})") from None
    if size == 0:
        raise AudioError(name, "file is empty (0 bytes)")
    return name


class _NativeStderrQuiet:
    """While held, file descriptor 2 goes to /dev/null: libsndfile's decoders (libmpg123 above
    all) print their own chatter there on a damaged file, where our one line is the message.
    Counted under a lock, so concurrent readers restore the real stderr exactly once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = -1

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                sys.stderr.flush()
                self._saved = os.dup(2)
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 2)
                os.close(devnull)
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    os.dup2(self._saved, 2)
                    os.close(self._saved)


_native_stderr_quiet = _NativeStderrQuiet()


@contextmanager
def _decode_errors(name: str) -> Iterator[None]:
    """Turn soundfile/OS failures into one-line AudioErrors without a chained traceback, with
    the decoders' own stderr chatter silenced.

    Wraps only the soundfile calls (open, info, read), never a yield, so errors in the caller's
    own code are not mislabelled as unreadable audio.
    """
    try:
        with _native_stderr_quiet():
            yield
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        reason = (getattr(e, "error_string", None) or str(e)).rstrip(".")
        # the formats hint only where the format was not recognised, not on a corrupt FLAC
        unsupported = "recognised" in reason.lower()
        hint = " (expected WAV, FLAC, OGG or MP3)" if unsupported else ""
        raise AudioError(name, f"cannot read audio: {reason}{hint}", unsupported) from None
    except OSError as e:
        raise AudioError(name, f"cannot open ({e.strerror or e})") from None
    except MemoryError:
        raise AudioError(name, "file too large to decode into memory") from None


def mix_to_mono(x: np.ndarray) -> np.ndarray:
    """float32 [n, channels] -> float32 [n], the mean of the channels (row by row, so the result
    does not depend on how a file is cut into blocks)."""
    return x[:, 0] if x.shape[1] == 1 else x.mean(axis=1, dtype=np.float32)


def _check_finite(x: np.ndarray, rate: float, source: str, offset: int = 0) -> None:
    """NaN/inf would poison the resampler and the model; name the first bad sample's time.

    offset: index of x[0] in the whole input (at the input's rate), for streamed blocks.
    """
    finite = np.isfinite(x)
    if not finite.all():
        first = offset + int(np.argmin(finite))
        raise AudioError(source, f"audio contains NaN or infinite samples "
                                 f"(first at {first / rate:.3f} s)")


class To16k:
    """Mono float32 at `rate` -> 16 kHz, fed in chunks (identity when rate is 16 kHz).

    A soxr.ResampleStream gives the same samples however the input is chunked, so files
    (streamed) and arrays (one chunk) go through this one resampler.
    """

    def __init__(self, rate: float):
        self._stream = (None if rate == SAMPLE_RATE else
                        soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32",
                                            quality=RESAMPLE_QUALITY))

    def push(self, mono: np.ndarray, last: bool = False) -> np.ndarray:
        """Resample the next chunk; last=True flushes the filter tail (once, at the very end)."""
        if self._stream is None:
            return mono
        return self._stream.resample_chunk(np.ascontiguousarray(mono, dtype=np.float32),
                                           last=last)


def resampled_length(frames: int, sample_rate: int) -> int:
    """Samples at 16 kHz that `frames` samples at `sample_rate` become (what soxr outputs).

    soxr's length is frames * 16000 / rate rounded half up; tests check it against load_audio.
    """
    frames, rate = int(frames), int(sample_rate)
    if rate == SAMPLE_RATE:
        return frames
    return (2 * frames * SAMPLE_RATE + rate) // (2 * rate)


def iter_file_16k(name: str, block_frames: int, warn: bool = True) -> Iterator[np.ndarray]:
    """Decode `name` block by block into float32 mono 16 kHz chunks (each owned by the caller).

    Reads at most block_frames frames at a time, so memory is bounded by one block whatever the
    file's length. Raises AudioError for empty or too-short audio (before anything is yielded)
    and for NaN/inf samples (when the block holding them is reached).
    """
    with _decode_errors(name):
        f = sf.SoundFile(name)
    with f:
        rate = int(f.samplerate)
        resampler = To16k(rate)
        read = produced = 0
        while True:
            with _decode_errors(name):
                block = f.read(block_frames, dtype="float32", always_2d=True)
            if block.shape[0] == 0 or block.shape[1] == 0:
                break
            mono = mix_to_mono(block)
            del block
            _check_finite(mono, rate, name, offset=read)
            read += mono.shape[0]
            out = resampler.push(mono)
            if out.size:
                produced += out.shape[0]
                yield out  # a fresh array: resampler output, a mix, or a view of a fresh block
        if read == 0:
            raise AudioError(name, "audio is empty (no samples)")
        promised = (_wav_header_frames(name, f) if warn and f.format in _EXACT_HEADERS
                    else None)
        if promised is not None and promised > read:
            log.warning("%s: the header promises %d frames but the file holds %d "
                        "(truncated?); transcribing what is there", name, promised, read)
        tail = resampler.push(np.zeros(0, np.float32), last=True)
        produced += tail.shape[0]
        if produced == 0:
            raise AudioError(name, "audio is too short to resample (no samples left)")
        if tail.size:
            yield tail


def _wav_header_frames(name: str, f: sf.SoundFile) -> int | None:
    """Frames a RIFF/WAVE header's data chunk promises (libsndfile quietly reports what the
    file holds instead), or None when the header cannot be read so."""
    import struct

    try:
        with open(name, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return None
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(head):
        chunk, size = head[pos:pos + 4], struct.unpack("<I", head[pos + 4:pos + 8])[0]
        if chunk == b"data":
            frame_bytes = {"PCM_U8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4,
                           "DOUBLE": 8}.get(f.subtype)
            return None if frame_bytes is None else size // (frame_bytes * f.channels)
        pos += 8 + size + (size & 1)
    return None


def _counted(chunks: Iterable[np.ndarray], lengths: list[int]) -> Iterator[np.ndarray]:
    n = 0
    for c in chunks:
        n += len(c)
        yield c
    lengths.append(n)


def _cut(chunks: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, int]]:
    """Re-cut a stream of 16 kHz chunks into fresh float32 [160000] buffers: (buffer, 160000)
    for each full segment, then once (buffer, fill) for what is left (fill < 160000, maybe 0;
    zeros past it)."""
    buf = np.zeros(SEGMENT_SAMPLES, dtype=np.float32)
    fill = 0
    for chunk in chunks:
        pos, n = 0, chunk.shape[0]
        while pos < n:
            take = min(n - pos, SEGMENT_SAMPLES - fill)
            buf[fill:fill + take] = chunk[pos:pos + take]
            fill += take
            pos += take
            if fill == SEGMENT_SAMPLES:
                yield buf, fill
                buf = np.zeros(SEGMENT_SAMPLES, dtype=np.float32)
                fill = 0
    yield buf, fill


def _segments_from_chunks(chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Re-cut a stream of 16 kHz chunks into fresh float32 [160000] segments, as segment_audio
    does: the last one zero-padded, at least one."""
    emitted = False
    for buf, fill in _cut(chunks):
        if fill or not emitted:  # every full segment; the rest if any, or one if none came
            yield buf
            emitted = True


def tail_start(n_samples: int, align: int) -> int | None:
    """Where the last segment of an n-sample input starts for transcription, or None when no
    segment needs moving (a whole number of segments, or a single segment).

    A segment that is mostly zero padding decodes badly (the first second of a dev clip
    alone gave 5 of its 10 notes). So the last partial segment is moved back to end at the
    audio's end, overlapping the segment before it; the overlap is merged once by the decoders
    (rolls.kept_frames, decode.FileNotes). Its start is rounded up to `align` samples (one
    encoder frame, a whole number of 10 ms ticks) so its frames line up with the others'; at
    most align - 1 samples of padding remain.
    """
    n, a = int(n_samples), int(align)
    if n <= SEGMENT_SAMPLES or n % SEGMENT_SAMPLES == 0:
        return None
    return -(-(n - SEGMENT_SAMPLES) // a) * a


def _tiled(head: np.ndarray) -> np.ndarray:
    """A short input's only segment: the audio repeated to fill 10 s, instead of zeros
    (there is no other real audio to fill it with; notes past the end are dropped later)."""
    reps = -(-SEGMENT_SAMPLES // max(len(head), 1))
    return np.tile(head, reps)[:SEGMENT_SAMPLES].astype(np.float32, copy=True)


def transcription_segments(chunks: Iterable[np.ndarray], align: int) -> Iterator[np.ndarray]:
    """Cut 16 kHz chunks into the segments `pianolm transcribe` decodes: segment i covers
    [10 i, 10 (i + 1)) s, except that the last partial one starts at tail_start (overlapping
    the one before) and a single short input is tiled. As many segments as segment_audio
    (num_segments), one or two held at a time."""
    prev: np.ndarray | None = None  # the last full segment: the tail's overlap comes from it
    full = 0
    for buf, fill in _cut(chunks):
        if fill == SEGMENT_SAMPLES:
            yield buf
            prev, full = buf, full + 1
        elif prev is None:
            yield _tiled(buf[:fill])
        elif fill:
            start = tail_start(full * SEGMENT_SAMPLES + fill, align)
            assert start is not None
            overlap = prev[start - (full - 1) * SEGMENT_SAMPLES:]
            last = np.zeros(SEGMENT_SAMPLES, dtype=np.float32)
            last[:len(overlap)] = overlap
            last[len(overlap):len(overlap) + fill] = buf[:fill]
            yield last


# ----------------------------------------------------------------------------- files


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says, so a caller can plan (progress, segment count) before decoding."""

    path: str
    sample_rate: int  # the file's own rate
    channels: int
    frames: int  # at the file's rate

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate

    @property
    def samples_16k(self) -> int:
        """Length of load_audio(path): the frames resampled to 16 kHz."""
        return resampled_length(self.frames, self.sample_rate)

    @property
    def num_segments(self) -> int:
        """How many segments stream_segments(path) yields (10 s at 16 kHz, at least 1)."""
        return num_segments(self.samples_16k)


def probe_audio(path: str | os.PathLike) -> AudioInfo:
    """Read only the header: rate, channels and length, without decoding any samples.

    Raises the same one-line AudioErrors as load_audio for a missing path, a directory, an
    empty or unreadable file, and also for a header with no channels, no frames, or too few
    frames to give a 16 kHz sample, so a file that probes cleanly can be streamed.
    """
    name = _checked_path(path)
    with _decode_errors(name):
        meta = sf.info(name)
    rate, channels, frames = int(meta.samplerate), int(meta.channels), int(meta.frames)
    if rate <= 0:
        raise AudioError(name, f"invalid sample rate {rate}")
    if channels < 1:
        raise AudioError(name, "file has no audio channels")
    if frames <= 0:
        raise AudioError(name, "audio is empty (no samples)")
    info = AudioInfo(path=name, sample_rate=rate, channels=channels, frames=frames)
    if info.samples_16k == 0:
        raise AudioError(name, "audio is too short to resample (no samples left)")
    return info


def load_audio(path: str | os.PathLike) -> np.ndarray:
    """Read an audio file (WAV/FLAC/OGG, or any format libsndfile reads) as float32 mono 16 kHz.

    Any PCM/float subtype is read as float32; any channel count is mixed to mono (mean of the
    channels); a rate other than 16000 Hz is resampled with soxr (quality 'HQ'). The file is
    decoded, mixed and resampled block by block (the same path as stream_segments), so only
    the 16 kHz result is ever whole in memory. Raises AudioError (one line, naming the file)
    for every user error.
    """
    name = _checked_path(path)
    chunks = list(iter_file_16k(name, _READ_BLOCK_FRAMES))
    try:
        out = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
    except MemoryError:
        raise AudioError(name, "file too large to decode into memory") from None
    return np.ascontiguousarray(out, dtype=np.float32)


def file_peak(path: str | os.PathLike) -> float:
    """The largest |sample| of load_audio(path), read block by block (a pass over the file)."""
    name = _checked_path(path)
    return max((float(np.max(np.abs(c))) for c in iter_file_16k(name, _READ_BLOCK_FRAMES,
                                                                 warn=False)
                if len(c)), default=0.0)


def stream_segments(path: str | os.PathLike, block_seconds: float = 10.0,
                    peak: float | None = None, align: int | None = None,
                    lengths: list[int] | None = None) -> Iterator[np.ndarray]:
    """Yield the file's 10 s segments (fresh float32 [160000], mono 16 kHz) in order.

    Exactly the rows of segment_audio(load_audio(path)) (the last one zero-padded, at least
    one), but the file is read `block_seconds` at a time and resampled as a stream, so memory
    stays bounded by one block plus a segment or two, however long the recording. The path
    and header are checked now (AudioError, as probe_audio); NaN/inf samples raise AudioError
    when the iteration reaches them, after the segments before them were yielded.

    peak: scale the audio to this peak first, exactly as normalise_peak(load_audio(path),
    peak) (one more pass over the file to find its peak).
    align: cut as transcription_segments(..., align) does instead (the last partial segment
    end-aligned, a short file tiled) rather than zero-padding the last segment.
    lengths: gets the number of 16 kHz samples read appended once the file is read (less than
    the header's for a truncated file).
    """
    if (isinstance(block_seconds, bool) or not isinstance(block_seconds, (int, float))
            or not math.isfinite(block_seconds) or block_seconds <= 0):
        raise ValueError(f"block_seconds must be a positive number, got {block_seconds!r}")
    info = probe_audio(path)
    block_frames = max(1, math.ceil(block_seconds * info.sample_rate))
    chunks = iter_file_16k(info.path, block_frames)
    if lengths is not None:
        chunks = _counted(chunks, lengths)
    top = file_peak(info.path) if peak is not None else 0.0
    if top > 0:
        gain = np.float32(peak / top)
        chunks = (c * gain for c in chunks)
    return _segments_from_chunks(chunks) if align is None else transcription_segments(chunks,
                                                                                        align)


# ----------------------------------------------------------------------------- arrays


def prepare_audio(samples: np.ndarray, sample_rate: int, *, source: str = "<array>"
                  ) -> np.ndarray:
    """Turn in-memory audio into the model's input: float32 mono at 16 kHz, C-contiguous.

    samples: 1-D [n] or 2-D [n, channels] (soundfile's layout; a [channels, n] array must be
    transposed first). Float arrays are used as they are; signed integers (int8/16/32/64) are
    scaled by 2**(bits-1), unsigned ones (e.g. 8-bit WAV's uint8) centred and scaled, so
    both land in [-1, 1). Channels are averaged; a rate other than 16000 is resampled with
    soxr ('HQ'), the same mix-down and resampler that load_audio uses for files. `source`
    names the input in error messages.
    """
    x = np.asarray(samples)
    if x.ndim not in (1, 2):
        raise AudioError(source, f"expected audio of shape [n] or [n, channels], got {x.shape}")
    if x.ndim == 2 and x.shape[1] > _MAX_CHANNELS and x.shape[1] > x.shape[0]:
        raise AudioError(source, f"shape {x.shape} looks like [channels, n]; "
                                 "pass samples.T ([n, channels])")
    try:
        rate = float(sample_rate)
    except (TypeError, ValueError):
        raise AudioError(source, f"invalid sample rate {sample_rate!r}") from None
    if not math.isfinite(rate) or rate <= 0:
        raise AudioError(source, f"invalid sample rate {sample_rate!r}")
    if x.shape[0] == 0 or (x.ndim == 2 and x.shape[1] == 0):
        raise AudioError(source, "audio is empty (no samples)")

    x = _to_float32(x, source)
    if x.ndim == 2:
        x = mix_to_mono(x)
    _check_finite(x, rate, source)
    resampler = To16k(rate)
    x = resampler.push(x, last=True)
    if x.size == 0:
        raise AudioError(source, "audio is too short to resample (no samples left)")
    return np.ascontiguousarray(x, dtype=np.float32)


def _to_float32(x: np.ndarray, source: str) -> np.ndarray:
    if x.dtype == np.float32:
        return x
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32)
    if np.issubdtype(x.dtype, np.signedinteger):
        scale = float(2 ** (np.iinfo(x.dtype).bits - 1))
        return (x.astype(np.float64 if x.itemsize > 2 else np.float32) / scale).astype(
            np.float32)
    if np.issubdtype(x.dtype, np.unsignedinteger):
        half = float(2 ** (np.iinfo(x.dtype).bits - 1))
        return ((x.astype(np.float64) - half) / half).astype(np.float32)
    raise AudioError(source, f"unsupported sample type {x.dtype} (use float or int PCM)")


def num_segments(n_samples: int) -> int:
    """Number of 10 s segments for n samples at 16 kHz: ceil(n / 160000), at least 1."""
    return max(1, -(-int(n_samples) // SEGMENT_SAMPLES))


def _check_mono(samples: np.ndarray) -> np.ndarray:
    x = np.asarray(samples)
    if x.ndim != 1:
        raise ValueError(f"expected mono 16 kHz samples of shape [n], got {x.shape} "
                         "(use load_audio or prepare_audio first)")
    return x


def segment_audio(samples: np.ndarray) -> np.ndarray:
    """Cut 16 kHz mono audio into non-overlapping 10 s segments: float32 [n_segments, 160000].

    The last segment is zero-padded; there is always at least one segment (an empty or very
    short input gives one, padded). Segment i covers [10 i, 10 (i + 1)) seconds.
    """
    x = _check_mono(samples)
    out = np.zeros((num_segments(x.shape[0]), SEGMENT_SAMPLES), dtype=np.float32)
    out.reshape(-1)[: x.shape[0]] = x
    return out


def normalise_peak(samples: np.ndarray, peak: float | None) -> np.ndarray:
    """Scale audio so its largest |sample| is `peak` (float32; as it is when peak is None or
    the audio is silent). A model whose velocity reads absolute level (manifest
    `audio.input_peak`) was trained on files scaled this way: one gain per file, so the
    dynamics within a piece are kept and any recording level maps to the same velocities."""
    x = np.asarray(samples, dtype=np.float32)
    top = float(np.max(np.abs(x))) if x.size else 0.0
    if peak is None or top == 0.0:
        return x
    return x * np.float32(peak / top)


def segments_from_array(samples: np.ndarray) -> Iterator[np.ndarray]:
    """Yield the rows of segment_audio(samples) one at a time, as fresh float32 [160000] arrays.

    The in-memory counterpart of stream_segments, so callers can treat a file and an array
    alike; only one segment is materialised at a time. samples: mono 16 kHz [n] (checked now).
    """
    x = _check_mono(samples)
    return _segments_from_chunks([x])


def batch_segments(segments: Iterable[np.ndarray], batch_size: int
                   ) -> Iterator[tuple[int, np.ndarray]]:
    """Group 10 s segments (from stream_segments or segments_from_array) into model batches.

    Yields (first_segment_index, float32 [b, 160000]) with b <= batch_size, in order; the final
    batch holds the remaining segments (not padded with empty ones). Only one batch is held.
    """
    _check_batch_size(batch_size)
    return _batches(segments, int(batch_size))


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _batches(segments: Iterable[np.ndarray], batch_size: int
             ) -> Iterator[tuple[int, np.ndarray]]:
    first = 0
    pending: list[np.ndarray] = []
    for seg in segments:
        if seg.shape != (SEGMENT_SAMPLES,):
            raise ValueError(f"expected segments of shape ({SEGMENT_SAMPLES},), got {seg.shape}")
        pending.append(seg)
        if len(pending) == batch_size:
            yield first, np.stack(pending).astype(np.float32, copy=False)
            first += len(pending)
            pending = []
    if pending:
        yield first, np.stack(pending).astype(np.float32, copy=False)


def iter_segment_batches(samples: np.ndarray, batch_size: int
                         ) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first_segment_index, float32 [b, 160000]) with b <= batch_size, in order.

    Same segments as segment_audio (the last one zero-padded, at least one), but only one
    batch is materialised at a time, so memory beyond the input stays bounded by
    batch_size * 160000 floats. The final batch holds the remaining segments (it is not
    padded with empty segments). Each yielded array is a fresh, writable copy. Equivalent to
    batch_segments(segments_from_array(samples), batch_size).
    """
    _check_batch_size(batch_size)
    return _batches(segments_from_array(samples), int(batch_size))
