"""Audio input: read any WAV/FLAC/OGG, mix to mono, resample to 16 kHz, cut into 10 s segments.

numpy + soundfile + soxr only (never torch). The model's input convention (DESIGN.md,
"Model facts"): float32 mono at 16 kHz, non-overlapping 10 s segments of 160000 samples.

    samples = load_audio("take.flac")            # float32 [n] at 16 kHz
    for first, batch in iter_segment_batches(samples, batch_size=8):
        ...                                      # batch: float32 [<=8, 160000]

Sample values are kept as they are (no normalisation, no clipping); integer input is scaled
to [-1, 1). Every user error (missing file, unreadable or unsupported file, empty audio,
NaN/inf samples) raises `AudioError` with a one-line message that names the file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np
import soundfile as sf
import soxr

from .vocab import SEGMENT_SECONDS

SAMPLE_RATE = 16000
SEGMENT_SAMPLES = int(round(SEGMENT_SECONDS * SAMPLE_RATE))  # 160000
RESAMPLE_QUALITY = "HQ"
_READ_BLOCK_FRAMES = 1 << 18  # frames read per block: bounds the multi-channel buffer
_MAX_CHANNELS = 256  # more "channels" than this in an array is almost surely [channels, n]

__all__ = [
    "SAMPLE_RATE", "SEGMENT_SAMPLES", "AudioError", "load_audio", "prepare_audio",
    "num_segments", "segment_audio", "iter_segment_batches",
]


class AudioError(Exception):
    """A user-facing audio problem; the message is one line naming the file and the problem."""

    def __init__(self, source: str, problem: str):
        self.source = source
        self.problem = _one_line(problem)
        super().__init__(f"{source}: {self.problem}")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def load_audio(path: str | os.PathLike) -> np.ndarray:
    """Read an audio file (WAV/FLAC/OGG, or any format libsndfile reads) as float32 mono 16 kHz.

    Any PCM/float subtype is read as float32; any channel count is mixed to mono (mean of the
    channels); a rate other than 16000 Hz is resampled with soxr (quality 'HQ'). The file is
    read in blocks and mixed down block by block, so a multi-channel file never sits in memory
    as a whole. Raises AudioError (one line, naming the file) for every user error.
    """
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

    try:
        with sf.SoundFile(name) as f:
            sample_rate = int(f.samplerate)
            channels = int(f.channels)
            blocks = []
            for block in f.blocks(blocksize=_READ_BLOCK_FRAMES, dtype="float32",
                                  always_2d=True):
                blocks.append(block[:, 0].copy() if channels == 1
                              else block.mean(axis=1, dtype=np.float32))
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        reason = getattr(e, "error_string", None) or str(e)
        raise AudioError(name, f"cannot read audio: {reason.rstrip('.')} "
                               "(expected WAV, FLAC or OGG)") from None
    except OSError as e:
        raise AudioError(name, f"cannot open ({e.strerror or e})") from None
    except MemoryError:
        raise AudioError(name, "file too large to decode into memory") from None

    mono = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    del blocks
    return prepare_audio(mono, sample_rate, source=name)


def prepare_audio(samples: np.ndarray, sample_rate: int, *, source: str = "<array>"
                  ) -> np.ndarray:
    """Turn in-memory audio into the model's input: float32 mono at 16 kHz, C-contiguous.

    samples: 1-D [n] or 2-D [n, channels] (soundfile's layout; a [channels, n] array must be
    transposed first). Float arrays are used as they are; signed integers (int8/16/32/64) are
    scaled by 2**(bits-1), unsigned ones (e.g. 8-bit WAV's uint8) centred and scaled, so
    both land in [-1, 1). Channels are averaged; a rate other than 16000 is resampled with
    soxr ('HQ'). `source` names the input in error messages (load_audio passes the path).
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
        x = x[:, 0] if x.shape[1] == 1 else x.mean(axis=1, dtype=np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        first = int(np.argmin(finite))
        raise AudioError(source, f"audio contains NaN or infinite samples "
                                 f"(first at {first / rate:.3f} s)")
    if rate != SAMPLE_RATE:
        x = soxr.resample(x, rate, SAMPLE_RATE, quality=RESAMPLE_QUALITY)
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


def iter_segment_batches(samples: np.ndarray, batch_size: int
                         ) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first_segment_index, float32 [b, 160000]) with b <= batch_size, in order.

    Same segments as segment_audio (the last one zero-padded, at least one), but only one
    batch is materialised at a time, so memory beyond the input stays bounded by
    batch_size * 160000 floats. The final batch holds the remaining segments (it is not
    padded with empty segments). Each yielded array is a fresh, writable copy.
    """
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size = int(batch_size)
    x = _check_mono(samples)
    n = x.shape[0]
    total = num_segments(n)
    for first in range(0, total, batch_size):
        b = min(batch_size, total - first)
        batch = np.zeros((b, SEGMENT_SAMPLES), dtype=np.float32)
        start = first * SEGMENT_SAMPLES
        chunk = x[start: start + b * SEGMENT_SAMPLES]
        batch.reshape(-1)[: chunk.shape[0]] = chunk
        yield first, batch
