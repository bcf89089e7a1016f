"""Waveform front-ends written as fixed convolutions and matmuls.

Both front-ends live inside the exported encoder graph (raw waveform in). ONNX has a DFT op
but TensorRT does not, so nothing here uses torch.stft / torch.fft: the STFT is a Conv1d whose
kernels are windowed Fourier atoms, the mel projection is a matmul, and the CQT is a bank of
complex (real + imaginary) Conv1d kernels evaluated at several sample rates. There is no
data-dependent control flow; every shape follows from the input length.

- `LogMel`: Kong et al.'s torchlibrosa setup (CRNN encoder), 100 frames/s, 229 bins.
- `CQT`: the nnAudio CQT that HPPNet uses, 50 frames/s, 352 bins, in dB with top_db 80.

`EncoderOutput` also lives here (the leaf module every encoder imports) so that the model
files and `encoders.py` (which imports them) form no import cycle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROLL_KEYS: tuple[str, ...] = ("onset", "offset", "frame", "velocity")


class EncoderOutput(NamedTuple):
    """What every encoder's forward returns (a pytree torch.export understands).

    rolls: onset/offset/frame/velocity posteriors, each [B, T, 88] in (0, 1).
    embedding: per-frame features the language model attends to, [B, T, E].
    """

    rolls: dict[str, torch.Tensor]
    embedding: torch.Tensor


# --------------------------------------------------------------------------------------
# Mel filterbank (librosa.filters.mel with htk=False, norm="slaney"), written in numpy.
# --------------------------------------------------------------------------------------

_F_SP = 200.0 / 3  # Slaney: linear part, 66.67 Hz per mel below 1 kHz
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # = 15
_LOGSTEP = math.log(6.4) / 27.0  # log part: 27 mels per factor 6.4 above 1 kHz


def hz_to_mel_slaney(hz: np.ndarray | float) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    lin = hz / _F_SP
    log = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(hz >= _MIN_LOG_HZ, log, lin)


def mel_to_hz_slaney(mel: np.ndarray | float) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    lin = _F_SP * mel
    log = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(mel, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log, lin)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float
) -> np.ndarray:
    """Slaney-style triangular mel filters, [n_mels, n_fft // 2 + 1], float64.

    Same definition as librosa.filters.mel(htk=False, norm="slaney"): triangles between
    consecutive mel-spaced edge frequencies, each scaled to unit area in Hz.
    """
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz_slaney(
        np.linspace(hz_to_mel_slaney(fmin), hz_to_mel_slaney(fmax), n_mels + 2)
    )
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]


# --------------------------------------------------------------------------------------
# Log-mel spectrogram
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogMelConfig:
    sample_rate: int = 16000
    n_fft: int = 2048
    hop_length: int = 160
    n_mels: int = 229
    fmin: float = 30.0
    fmax: float = 8000.0
    amin: float = 1e-10  # power floor before the log (torchlibrosa's amin, ref = 1)


class LogMel(nn.Module):
    """[B, samples] waveform -> [B, frames, n_mels] log-mel power in dB.

    Periodic Hann window, centred frames with reflect padding (frames = samples // hop + 1),
    power spectrum, Slaney mel filterbank, 10 * log10(max(x, amin)).
    """

    def __init__(self, config: LogMelConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or LogMelConfig()
        n_bins = cfg.n_fft // 2 + 1
        n = np.arange(cfg.n_fft)
        window = 0.5 - 0.5 * np.cos(2 * np.pi * n / cfg.n_fft)  # periodic Hann (fftbins)
        phase = 2 * np.pi * np.outer(np.arange(n_bins), n) / cfg.n_fft
        # Rows: real parts then imaginary parts of the windowed DFT atoms (sign irrelevant
        # for the power). Fixed, so buffers rebuilt here rather than stored in checkpoints.
        kernels = np.concatenate([np.cos(phase), -np.sin(phase)]) * window
        self.register_buffer(
            "stft_kernels",
            torch.tensor(kernels[:, None, :], dtype=torch.float32),
            persistent=False,
        )
        mel = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)
        self.register_buffer(
            "mel_matrix", torch.tensor(mel.T, dtype=torch.float32), persistent=False
        )
        self.n_bins = n_bins

    def num_frames(self, num_samples: int) -> int:
        return num_samples // self.config.hop_length + 1

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        x = F.pad(waveform.unsqueeze(1), (cfg.n_fft // 2, cfg.n_fft // 2), mode="reflect")
        spec = F.conv1d(x, self.stft_kernels, stride=cfg.hop_length)  # [B, 2 * bins, T]
        real, imag = spec[:, : self.n_bins], spec[:, self.n_bins :]
        power = (real * real + imag * imag).transpose(1, 2)  # [B, T, bins]
        mel = torch.matmul(power, self.mel_matrix)  # [B, T, n_mels]
        return 10.0 * torch.log10(torch.clamp(mel, min=cfg.amin))


# --------------------------------------------------------------------------------------
# Constant-Q transform, multirate
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CQTConfig:
    sample_rate: int = 16000
    hop_length: int = 320
    n_bins: int = 352
    bins_per_octave: int = 48
    fmin: float = 27.5 * 2 ** (-1 / 24)  # a quarter-tone below A0: bins centred on keys
    filter_scale: float = 1.0
    # nnAudio's default normalization_type="librosa": L1-normalised kernels times
    # sqrt(kernel length), as HPPNet's nnAudio CQT computes it.
    scale_by_sqrt_length: bool = True
    top_db: float = 80.0
    # HPPNet applies torchaudio's AmplitudeToDB(top_db=80) with its default stype="power"
    # to the CQT *magnitude*, i.e. 10 * log10(|C|). Set 20.0 for amplitude dB proper.
    db_multiplier: float = 10.0
    amin: float = 1e-10
    # Anti-alias low-pass for each decimation by 2: Kaiser-windowed half-band sinc.
    # 47 taps, beta 12: passband (<= 0.14 cycles/sample) flat to 2e-5 dB, stopband
    # (>= 0.36 cycles/sample, where aliases would land on CQT bins) below -120 dB.
    lowpass_taps: int = 47
    lowpass_beta: float = 12.0


def cqt_frequencies(config: CQTConfig) -> np.ndarray:
    return config.fmin * 2.0 ** (np.arange(config.n_bins) / config.bins_per_octave)


def cqt_kernel_lengths(config: CQTConfig) -> np.ndarray:
    """Full-rate kernel length per bin: ceil(Q * sr / f), Q = scale / (2^(1/bpo) - 1)."""
    q = config.filter_scale / (2 ** (1 / config.bins_per_octave) - 1)
    return np.ceil(q * config.sample_rate / cqt_frequencies(config)).astype(np.int64)


def cqt_window(offsets: np.ndarray, length: int) -> np.ndarray:
    """Hann window of `length` samples centred on offset 0, evaluated at (real) offsets.

    Offsets are in full-rate samples; zero outside |offset| < length / 2.
    """
    w = 0.5 + 0.5 * np.cos(2 * np.pi * offsets / length)
    return np.where(np.abs(offsets) < length / 2, w, 0.0)


def lowpass_filter(taps: int, beta: float) -> np.ndarray:
    n = np.arange(taps) - (taps - 1) // 2
    h = 0.5 * np.sinc(0.5 * n) * np.kaiser(taps, beta)
    return h / h.sum()  # unit DC gain


class CQT(nn.Module):
    """[B, samples] waveform -> [B, frames, n_bins] CQT magnitude in dB (top_db per example).

    Bin k has centre f_k = fmin * 2^(k / bpo) and a Hann-windowed complex kernel of
    ceil(Q sr / f_k) samples, L1-normalised, centred on each frame (frames = samples // hop
    + 1, reflect padding) -- nnAudio's CQT1992v2 definition, up to a half-sample kernel shift
    for odd lengths.

    A single full-rate kernel bank would need ~41k taps for the lowest bin (~116 MB). Instead
    the bins are grouped by octave: the top octave is evaluated at the full rate, and each
    octave below it on the signal low-passed and decimated by 2 once more, where its kernels
    are as short (in samples) as the top octave's. Decimation stops when the hop would no
    longer be an integer (hop 320 = 2^6 * 5: six times); the octaves below that share the last
    rate with longer kernels. A kernel sampled at rate sr / 2^d is the full-rate kernel
    subsampled by 2^d (times 2^d); since it is narrow-band and the low-pass is flat across its
    band, the inner product is unchanged up to the filter's ripple and stopband leakage.
    """

    def __init__(self, config: CQTConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or CQTConfig()
        freqs = cqt_frequencies(cfg)
        lengths = cqt_kernel_lengths(cfg)
        if freqs[-1] >= cfg.sample_rate / 2:
            raise ValueError("top CQT bin above Nyquist")

        hop_decimations = (cfg.hop_length & -cfg.hop_length).bit_length() - 1
        octave_from_top = (cfg.n_bins - 1 - np.arange(cfg.n_bins)) // cfg.bins_per_octave
        level_of_bin = np.minimum(octave_from_top, hop_decimations)
        self.n_levels = int(level_of_bin.max()) + 1

        # The passband of the cascade must cover the top bin of every decimated level
        # (centre + main lobe), at the rate before the decimation.
        passband = 0.14
        for level in range(1, self.n_levels):
            k = int(np.flatnonzero(level_of_bin == level).max())
            main_lobe = 2 * cfg.sample_rate / lengths[k]  # Hann: +-2 bins of its own DFT
            edge = (freqs[k] + main_lobe) / (cfg.sample_rate / 2 ** (level - 1))
            if edge > passband:
                raise ValueError(f"CQT level {level} exceeds the low-pass passband")

        self.register_buffer(
            "lowpass",
            torch.tensor(
                lowpass_filter(cfg.lowpass_taps, cfg.lowpass_beta)[None, None], dtype=torch.float32
            ),
            persistent=False,
        )

        # Per level: half-width K (low-rate taps) and the kernel bank [2 * bins, 1, 2K + 1].
        self.half_widths: list[int] = []
        self.level_bins: list[int] = []
        for level in range(self.n_levels):
            bins = np.flatnonzero(level_of_bin == level)  # ascending bin index
            step = 2**level
            half = int(lengths[bins].max()) // 2 // step + 1
            offsets = (np.arange(2 * half + 1) - half) * step  # full-rate sample offsets
            real = np.zeros((len(bins), offsets.size))
            imag = np.zeros_like(real)
            for row, k in enumerate(bins):
                full = np.arange(-(lengths[k] // 2) - 1, lengths[k] // 2 + 2)
                l1 = cqt_window(full, lengths[k]).sum()  # L1 norm of the full-rate kernel
                gain = step / l1
                if cfg.scale_by_sqrt_length:
                    gain *= math.sqrt(lengths[k])
                w = cqt_window(offsets, lengths[k]) * gain
                phase = 2 * np.pi * freqs[k] * offsets / cfg.sample_rate
                real[row] = w * np.cos(phase)
                imag[row] = w * np.sin(phase)
            bank = np.concatenate([real, imag])[:, None, :]
            self.register_buffer(
                f"kernels_{level}", torch.tensor(bank, dtype=torch.float32), persistent=False
            )
            self.half_widths.append(half)
            self.level_bins.append(len(bins))

        # Reflect-pad the full-rate signal once, enough for the widest kernel at the lowest
        # rate plus the decimation filters' zero-padded edges; a multiple of 2^(levels-1) so
        # that every level's frame centres land on whole samples.
        step = 2 ** (self.n_levels - 1)
        reach = (self.half_widths[-1] + cfg.lowpass_taps) * step
        self.pad = int(math.ceil(reach / step) * step)

    @property
    def min_samples(self) -> int:
        """Shortest input the reflect padding accepts."""
        return self.pad + 1

    def num_frames(self, num_samples: int) -> int:
        return num_samples // self.config.hop_length + 1

    def magnitude(self, waveform: torch.Tensor) -> torch.Tensor:
        """|CQT| (with the configured length scaling), [B, n_bins, frames]."""
        cfg = self.config
        frames = waveform.shape[-1] // cfg.hop_length + 1
        x = F.pad(waveform.unsqueeze(1), (self.pad, self.pad), mode="reflect")
        outputs = []
        for level in range(self.n_levels):
            if level > 0:
                x = F.conv1d(x, self.lowpass, stride=2, padding=(cfg.lowpass_taps - 1) // 2)
            step = 2**level
            # Sample m of this level is at original time m * step - pad; frame t is centred
            # on t * hop, so the kernel window for frame 0 starts at pad / step - K.
            start = self.pad // step - self.half_widths[level]
            kernels = getattr(self, f"kernels_{level}")
            spec = F.conv1d(x[:, :, start:], kernels, stride=cfg.hop_length // step)
            spec = spec[:, :, :frames]
            n = self.level_bins[level]
            real, imag = spec[:, :n], spec[:, n:]
            outputs.append(torch.sqrt(real * real + imag * imag))
        return torch.cat(outputs[::-1], dim=1)  # deepest level holds the lowest bins

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        mag = self.magnitude(waveform).transpose(1, 2)  # [B, T, n_bins]
        db = cfg.db_multiplier * torch.log10(torch.clamp(mag, min=cfg.amin))
        # top_db relative to each example's own maximum (torchaudio's AmplitudeToDB takes
        # the max over the whole batch for 3-D input, which couples examples in a batch).
        peak = torch.amax(db, dim=(1, 2), keepdim=True)
        return torch.maximum(db, peak - cfg.top_db)
