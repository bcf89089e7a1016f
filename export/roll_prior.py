"""The roll prior: each stage's logits start from its encoder's rolls (DecoderConfig.roll_prior).

The shipped encoder's embedding *is* its four rolls (onset, offset, frame, velocity; 88 keys
each), and peak picking reads notes from them better than an LM that must learn, through
attention, to find a key's column in a frame vector. So each stage gets the rolls' evidence
where it decides, key by key, as additive logit terms with learned scales. Initialised so that
greedy decoding starts as the roll decoder does (runtime/rolls.py), the LM has to learn only
the corrections its context allows (re-strikes, ghosts, chords, pedal offsets, phrasing).

Per segment, once (`features`, in the cross-KV graph): peak-masked onset logits, offset and
frame logits, and the velocity roll, as [B, 1, 4 x 88, T] (graphs.ROLL_PRIOR). Per position
(`forward`, in the step graph), from the token there and its query tick:
- onset stage:
  - after a time token, the pitch slots get the onset peaks at its frame (and the frames
    beside it);
  - after a pitch or the task token, the time slots get the next onset evidence frame by
    frame, minus what skipping earlier confident peaks would miss; eos gets the threshold
    minus the best evidence left.
- velocity stage: after a pitch, the velocity slots get a parabola around the velocity roll at
  the note's key and onset frame.
- offset stage: after a pitch, the time slots get the key's end evidence (an offset peak, or
  the frame roll falling), minus the skipped ones; note_sustain gets the threshold minus the
  best end evidence left in the segment.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pianolm.runtime import vocab

KEYS = vocab.NUM_PITCHES
STAGES = ("onset", "velocity", "offset")
PEAK_PENALTY = 10.0  # subtracted from onset logits that are not a local maximum in time
_EPS = 1e-4  # rolls clamped to [eps, 1 - eps] before the logit: |logit| <= 9.2


def _logit(p: Tensor) -> Tensor:
    p = p.clamp(_EPS, 1 - _EPS)
    return torch.log(p) - torch.log1p(-p)


def features(rolls: Tensor) -> Tensor:
    """The decoder's embeddings, the four rolls [B, T, 4 x 88] (ROLL_KEYS order: onset, offset,
    frame, velocity) -> the prior's evidence [B, 1, 4 x 88, T]: onset and offset logits with
    non-peaks pushed down, frame logits, and the velocity roll."""
    onset, offset, frame, velocity = rolls.split(KEYS, dim=-1)
    peaks = [_peaks(_logit(roll).transpose(1, 2)) for roll in (onset, offset)]  # [B, 88, T]
    rest = torch.cat([_logit(frame), velocity], dim=-1).transpose(1, 2)
    return torch.cat([*peaks, rest], dim=1)[:, None]


def _peaks(logits: Tensor) -> Tensor:
    """[B, 88, T] logits with every frame that is not a maximum of itself and its two
    neighbours in time pushed down by PEAK_PENALTY (max_pool1d would fix T in the graph)."""
    edge = torch.full_like(logits[..., :1], -2 * PEAK_PENALTY)  # an edge's missing neighbour
    before = torch.cat([edge, logits[..., :-1]], dim=-1)
    after = torch.cat([logits[..., 1:], edge], dim=-1)
    return torch.where((logits >= before) & (logits >= after), logits, logits - PEAK_PENALTY)


def _float_logit(p: float) -> float:
    return math.log(p / (1 - p))


def _scalar(value: float) -> nn.Parameter:
    # 1-D, so train_lm keeps it out of weight decay
    return nn.Parameter(torch.tensor([value]))


class RollPrior(nn.Module):
    """Additive logit terms from the rolls for one stage (see the module doc)."""

    def __init__(self, stage: str, ticks_per_frame: int) -> None:
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"roll_prior {stage!r}: choose from {list(STAGES)}")
        self.stage = stage
        self.ticks_per_frame = ticks_per_frame
        self.threshold = _scalar(0.0)  # evidence logit of "a note here" (p = 0.5)
        if stage == "onset":
            self.pitch_here = _scalar(1.0)
            self.pitch_beside = _scalar(0.5)
            # a chord's keys come lowest first (the grammar): a confident key gains this for
            # every confident key above it, more than any two peaks' logits differ
            self.pitch_order = _scalar(20.0)
            self.time_scale = _scalar(1.0)
            self.same_tick = _scalar(1.0)  # a chord's next key at the tick of the one before
            self.first_tick = _scalar(0.5)  # a frame's onset at its first tick (the drafts')
            self.skip_penalty = _scalar(2.0)
            self.eos_scale = _scalar(1.0)
        elif stage == "velocity":
            self.velocity_gain = _scalar(127.0)  # the roll x 127 is the MIDI velocity
            self.velocity_offset = _scalar(0.0)
            # the parabola's curvature: a Gaussian of sd 5 velocity units, about the rolls' error
            self.velocity_width = _scalar(0.02)
        else:
            self.end_scale = _scalar(1.0)
            self.skip_penalty = _scalar(2.0)
            self.sustain_scale = _scalar(1.0)
            self.first_tick = _scalar(0.5)
            # A note has ended at an offset peak above offset_level, or where the frame roll's
            # logit falls below frame_level (p = 0.5 until calibrated)
            self.frame_level = _scalar(0.0)
            self.offset_level = _scalar(0.0)

    # The scales every term of a stage is multiplied by: scaling all of them by one factor
    # scales the prior's logits, and changes no argmax among the slots it decides
    _OUTER = {"onset": ("pitch_here", "pitch_beside", "pitch_order", "time_scale", "same_tick",
                        "first_tick", "eos_scale"),
              "velocity": ("velocity_width",),
              "offset": ("end_scale", "first_tick", "sustain_scale")}

    @torch.no_grad()
    def temper(self, factor: float) -> None:
        """Multiply the prior's logits by `factor` (a temperature of 1 / factor)."""
        for name in self._OUTER[self.stage]:
            getattr(self, name).mul_(factor)

    @torch.no_grad()
    def calibrate(self, onset_threshold: float, offset_threshold: float,
                  frame_threshold: float, velocity_curve: tuple[float, ...] = ()) -> None:
        """Start from the encoder's tuned roll thresholds (runtime/rolls.py RollDecodeConfig, as
        `pianolm train tune-rolls` stores them), as the tuned roll decoder reads the rolls:
        onsets from the onset threshold, a note's end at an offset peak above its threshold or
        where the frame roll falls below its own, a velocity curve by its straight-line fit
        over the roll's range."""
        if self.stage == "onset":
            self.threshold.fill_(_float_logit(onset_threshold))
        elif self.stage == "offset":
            self.offset_level.fill_(_float_logit(offset_threshold))
            self.frame_level.fill_(_float_logit(frame_threshold))
        elif velocity_curve:
            x = torch.linspace(0, 127, 128, dtype=torch.float64)
            y = sum(c * x ** (len(velocity_curve) - 1 - i) for i, c in enumerate(velocity_curve))
            gain = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
            self.velocity_gain.fill_(float(gain) * 127)  # per unit of the roll (0..1)
            self.velocity_offset.fill_(float(y.mean() - gain * x.mean()))

    def forward(self, tokens: Tensor, query_ticks: Tensor, evidence: Tensor) -> Tensor:
        """tokens, query_ticks [B, n]; evidence [B, 1, 4 x 88, T] (`features`) -> additive
        logits [B, n, vocab]."""
        ev = evidence[:, 0]  # [B, 352, T]
        frames = ev.shape[-1]
        ticks = torch.arange(vocab.SEGMENT_TICKS + 1, device=tokens.device)
        tick_frame = torch.div(ticks, self.ticks_per_frame, rounding_mode="floor")
        first = (ticks % self.ticks_per_frame == 0).float()  # a frame's first tick
        frame = _within(torch.div(query_ticks, self.ticks_per_frame, rounding_mode="floor"),
                        frames - 1)  # [B, n]
        key = _within(tokens - vocab.PITCH_BASE, KEYS - 1)  # meaningful after a pitch
        slot_frame = _within(tick_frame, frames - 1)  # each time slot's frame
        after_pitch = ((tokens >= vocab.PITCH_BASE) & (tokens < vocab.VELOCITY_BASE)).float()
        parts: dict[str, Tensor] = {}
        if self.stage == "onset":
            after_time = ((tokens >= vocab.TIME_BASE) & (tokens < vocab.PITCH_BASE)).float()
            parts["pitch"] = after_time[..., None] * self._pitches(ev[:, :KEYS], frame)
            next_time = torch.maximum(after_pitch, (tokens == vocab.TASK_ONSET).float())
            # the current note's key: a chord's later keys at this frame are still to come
            done_key = torch.where(after_pitch > 0, key, torch.full_like(key, -1))
            times, chord, eos = self._next_onsets(ev[:, :KEYS], frame, done_key)
            same = (ticks[None, None, :] == query_ticks[..., None]).float()
            times = times[..., slot_frame] + same * chord[..., None] + self.first_tick * first
            parts["time"] = next_time[..., None] * times
            parts["eos"] = next_time * eos
        elif self.stage == "velocity":
            parts["velocity"] = after_pitch[..., None] * self._velocities(ev, frame, key)
        else:
            times, sustain = self._note_end(ev, frame, key)
            times = times[..., slot_frame] + self.first_tick * first
            parts["time"] = after_pitch[..., None] * times
            parts["sustain"] = after_pitch * sustain
        return _assemble(parts, tokens.shape, ev.dtype)

    def _confident(self, evidence: Tensor) -> Tensor:
        """0 below the threshold, 1 from a quarter logit above it."""
        return torch.clamp((evidence - self.threshold) * 4.0, 0.0, 1.0)

    def _pitches(self, onsets: Tensor, frame: Tensor) -> Tensor:
        """Onset peaks at each position's frame and the better of the frames beside it, the
        lowest confident key first: [B, n, 88] (the pitch slots)."""
        here = _at_frames(onsets, frame)
        confident = self._confident(here)
        above = confident.sum(dim=-1, keepdim=True) - torch.cumsum(confident, dim=-1)
        beside = torch.maximum(_at_frames(onsets, frame - 1), _at_frames(onsets, frame + 1))
        return (self.pitch_here * here + self.pitch_beside * beside
                + self.pitch_order * confident * above)

    def _skipping(self, evidence: Tensor, first: Tensor) -> Tensor:
        """evidence [B, n, T] per frame, first [B, n] the first frame that counts -> the time
        term: scaled evidence minus the penalty for every confident frame before it."""
        frames = torch.arange(evidence.shape[-1], device=evidence.device)
        counts = frames[None, None, :] >= first[..., None]
        confident = torch.relu(evidence - self.threshold) * counts
        skipped = torch.cumsum(confident, dim=-1) - confident  # strictly before each frame
        return evidence - self.skip_penalty * skipped

    def _next_onsets(self, onsets: Tensor, frame: Tensor, done_key: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor]:
        """Time evidence [B, n, T] for the next onset after (frame, done_key), the bonus [B, n]
        of its own tick for a chord's next key, and the eos term [B, n]."""
        best = onsets.max(dim=1).values[:, None, :].expand(-1, frame.shape[1], -1)  # [B, n, T]
        # at the current frame only the keys above the note just written are still to come
        higher = torch.arange(KEYS, device=onsets.device)[None, None, :] > done_key[..., None]
        rest = _max_where(_at_frames(onsets, frame), higher)
        frames = torch.arange(onsets.shape[-1], device=onsets.device)
        at_frame = frames[None, None, :] == frame[..., None]
        evidence = torch.where(at_frame, rest[..., None], best)
        left = _max_where(evidence, frames[None, None, :] >= frame[..., None])
        times = self.time_scale * self._skipping(evidence, frame)
        chord = self.same_tick * self._confident(rest)
        return times, chord, self.eos_scale * (self.threshold - left)

    def _velocities(self, ev: Tensor, frame: Tensor, key: Tensor) -> Tensor:
        """A parabola over the 128 velocity slots around the velocity roll at the note's key
        and onset frame: [B, n, 128]."""
        rows = (3 * KEYS + key)[:, :, None].expand(-1, -1, ev.shape[-1])
        roll = torch.gather(ev, 1, rows)  # [B, n, T] the key's velocity roll
        at = torch.gather(roll, 2, frame[:, :, None])  # [B, n, 1]
        target = self.velocity_gain * at + self.velocity_offset
        slots = torch.arange(vocab.NUM_VELOCITIES, device=ev.device, dtype=ev.dtype)
        return -self.velocity_width * (slots - target) ** 2

    def _note_end(self, ev: Tensor, frame: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
        """Time evidence [B, n, T] for where the note at (key, onset frame) ends, and the
        note_sustain term [B, n]: it sounds past the segment's end."""
        t = ev.shape[-1]

        def series(block: int) -> Tensor:  # the key's row of one roll, [B, n, T]
            return torch.gather(ev, 1, (block * KEYS + key)[:, :, None].expand(-1, -1, t))

        # the frame roll below its level, or an offset peak above its own; confident above 0
        ended = torch.maximum(series(1) - self.offset_level, self.frame_level - series(2))
        frames = torch.arange(t, device=ev.device)
        left = _max_where(ended, frames[None, None, :] > frame[..., None])
        times = self.end_scale * self._skipping(ended, frame + 1)
        return times, self.sustain_scale * (self.threshold - left)


def _at_frames(rolls: Tensor, frame: Tensor) -> Tensor:
    """rolls [B, 88, T], frame [B, n] (kept in range) -> each position's frame [B, n, 88]."""
    index = _within(frame, rolls.shape[-1] - 1)[:, :, None].expand(-1, -1, KEYS)
    return torch.gather(rolls.transpose(1, 2), 1, index)


def _max_where(evidence: Tensor, keep: Tensor) -> Tensor:
    """The largest evidence along the last axis where `keep`; -PEAK_PENALTY where none is."""
    return torch.where(keep, evidence, torch.full_like(evidence, -PEAK_PENALTY)).max(dim=-1).values


def _within(index: Tensor, last: int) -> Tensor:
    """An int64 index kept in [0, last], by Max and Min (TensorRT takes no int64 Clip)."""
    return torch.minimum(torch.maximum(index, torch.zeros_like(index)),
                         torch.full_like(index, last))


def _assemble(parts: dict[str, Tensor], shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """The terms at their slots of the vocabulary, zeros elsewhere: [B, n, vocab]."""
    b, n = shape
    device = next(iter(parts.values())).device

    def part(name: str | None, width: int) -> Tensor:
        value = parts.get(name) if name else None
        if value is None:
            return torch.zeros(b, n, width, dtype=dtype, device=device)
        return (value if value.dim() == 3 else value[..., None]).to(dtype)

    # pad sos (0, 1), eos, the task tokens (3..6), note_sustain, times, pitches, velocities
    pieces = [part(None, vocab.EOS), part("eos", 1),
              part(None, vocab.NOTE_SUSTAIN - vocab.EOS - 1), part("sustain", 1),
              part("time", vocab.SEGMENT_TICKS + 1), part("pitch", KEYS),
              part("velocity", vocab.NUM_VELOCITIES)]
    return torch.cat(pieces, dim=-1)
