"""Generated piano material from a seed: chords, arpeggios, scales, runs, repeated notes,
Alberti-bass accompaniment with melody, and random polyphony; wide velocities (10..127),
densities up to ~30 notes/s, and sustain pedal.

    piece = generate_piece(seconds=20.0, seed=7)
    piece.notes, piece.pedal        # notes as played + (down, up) pedal intervals

A piece is a chain of sections of 1.5..5 s. Each section draws its kind, register, tempo,
dynamic shape (flat, crescendo, diminuendo, hairpin, random accents), articulation (staccato
to legato) and pedalling (none, one long press, or legato changes with the harmony). The
onset rate times the chord size of a section never exceeds `max_density`, and a final pass
guarantees that no 1 s window holds more than `max_density` onsets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pianolm.runtime.notes import Note

from .common import Pedal, Piece, limit_density, merge_pedal, tidy_notes

KINDS = ("chords", "arpeggio", "scale", "run", "repeated", "alberti", "polyphony")

_SCALES = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "harmonic": (0, 2, 3, 5, 7, 8, 11),
    "chromatic": tuple(range(12)),
    "whole": (0, 2, 4, 6, 8, 10),
    "pentatonic": (0, 2, 4, 7, 9),
}
_CHORDS = {
    "major": (0, 4, 7),
    "minor": (0, 3, 7),
    "dim": (0, 3, 6),
    "aug": (0, 4, 8),
    "dom7": (0, 4, 7, 10),
    "maj7": (0, 4, 7, 11),
    "min7": (0, 3, 7, 10),
    "sus4": (0, 5, 7),
    "dim7": (0, 3, 6, 9),
}


@dataclass
class GenConfig:
    """Ranges for generated material."""

    min_velocity: int = 10
    max_velocity: int = 127
    max_density: float = 30.0  # onsets per second, hard limit over any 1 s window
    low: int = 21
    high: int = 108
    section_seconds: tuple[float, float] = (1.5, 5.0)
    pedal_probability: float = 0.5
    kinds: tuple[str, ...] = KINDS
    kind_weights: dict[str, float] = field(default_factory=lambda: {
        "chords": 1.0, "arpeggio": 1.0, "scale": 0.8, "run": 0.6, "repeated": 0.5,
        "alberti": 0.8, "polyphony": 1.2})


@dataclass
class _Section:
    rng: np.random.Generator
    cfg: GenConfig
    start: float
    length: float
    notes: list[Note] = field(default_factory=list)
    pedal: list[Pedal] = field(default_factory=list)

    # ---- shared drawing helpers
    def velocity_curve(self) -> Callable[[float], float]:
        """A dynamic shape over the section: time (s, from section start) -> velocity."""
        rng, cfg = self.rng, self.cfg
        lo, hi = cfg.min_velocity, cfg.max_velocity
        a, b = sorted(rng.uniform(lo, hi, size=2))
        shape = rng.choice(["flat", "cresc", "dim", "hairpin", "accents", "random"])
        length = max(self.length, 1e-3)
        level = float(rng.uniform(lo, hi))
        spread = float(rng.uniform(3.0, 10.0))

        def curve(t: float) -> float:
            x = min(max(t / length, 0.0), 1.0)
            if shape == "flat":
                v = level
            elif shape == "cresc":
                v = a + (b - a) * x
            elif shape == "dim":
                v = b - (b - a) * x
            elif shape == "hairpin":
                v = a + (b - a) * (1 - abs(2 * x - 1))
            elif shape == "accents":
                v = a if rng.random() > 0.25 else b
            else:
                v = rng.uniform(lo, hi)
            return v + rng.normal(0.0, spread)

        return curve

    def velocity(self, curve: Callable[[float], float], t: float) -> int:
        v = curve(t - self.start)
        return int(np.clip(round(v), self.cfg.min_velocity, self.cfg.max_velocity))

    def articulation(self) -> float:
        """Duration as a fraction of the time to the next onset."""
        return float(self.rng.choice([self.rng.uniform(0.15, 0.45),   # staccato
                                      self.rng.uniform(0.6, 0.9),     # non legato
                                      self.rng.uniform(0.92, 1.1)]))  # legato

    def jitter(self, sd: float = 0.004) -> float:
        return float(self.rng.normal(0.0, sd))

    def register(self, span: int) -> int:
        """A random lowest pitch such that [low, low + span] fits the keyboard."""
        lo, hi = self.cfg.low, max(self.cfg.low, self.cfg.high - span)
        return int(self.rng.integers(lo, hi + 1))

    def rate(self, lo: float, hi: float, notes_per_onset: int = 1) -> float:
        """Onsets per second, log-uniform in [lo, hi], capped by the density limit."""
        hi = min(hi, self.cfg.max_density / max(1, notes_per_onset))
        lo = min(lo, hi)
        return float(np.exp(self.rng.uniform(np.log(lo), np.log(hi))))

    def add(self, onset: float, duration: float, pitch: int, velocity: int) -> None:
        if self.cfg.low <= pitch <= self.cfg.high:
            self.notes.append(Note(onset, onset + max(duration, 0.03), int(pitch), velocity))

    def grid(self, rate: float) -> np.ndarray:
        return self.start + np.arange(0.0, self.length, 1.0 / rate)

    def pedal_for(self, changes: list[float]) -> None:
        """Pedalling for the section: none, one long press, or legato changes at `changes`."""
        rng = self.rng
        if rng.random() > self.cfg.pedal_probability:
            return
        end = self.start + self.length
        if not changes or rng.random() < 0.3:
            down = self.start + rng.uniform(0.02, 0.15)
            up = end + rng.uniform(-0.1, 0.3)
            self.pedal.append((down, max(up, down + 0.2)))
            return
        times = sorted(set([self.start, *changes]))
        for i, t in enumerate(times):
            nxt = times[i + 1] if i + 1 < len(times) else end
            down = t + rng.uniform(0.04, 0.15)   # legato pedal: press just after the strike
            up = nxt + rng.uniform(-0.03, 0.05)  # release around the next strike
            if up - down > 0.1:
                self.pedal.append((down, up))


# ---- section kinds


def _chords(s: _Section) -> None:
    rng = s.rng
    size = int(rng.integers(2, 7))
    rate = s.rate(0.6, 6.0, size)
    curve = s.velocity_curve()
    art = s.articulation() if rng.random() < 0.7 else rng.uniform(1.0, 2.5)
    changes = []
    base = s.register(30)
    for t in s.grid(rate):
        kind = _CHORDS[rng.choice(list(_CHORDS))]
        root = base + int(rng.integers(0, 12))
        pitches = {root + kind[i % len(kind)] + 12 * (i // len(kind)) for i in range(size)}
        if rng.random() < 0.5:  # two hands: a bass octave under the chord
            pitches.add(root - 12 * int(rng.integers(1, 3)))
        pitches = sorted(pitches)[:size]
        vel = s.velocity(curve, t)
        spread = rng.uniform(0.0, 0.03) if rng.random() < 0.3 else 0.0  # rolled chords
        for k, p in enumerate(pitches):
            on = t + s.jitter() + k * spread
            s.add(on, art / rate + s.jitter(0.01), p, int(np.clip(vel + rng.normal(0, 4), 1, 127)))
        changes.append(float(t))
    s.pedal_for(changes)


def _arpeggio(s: _Section) -> None:
    rng = s.rng
    kind = _CHORDS[rng.choice(list(_CHORDS))]
    octaves = int(rng.integers(1, 4))
    root = s.register(12 * octaves + 12)
    up = [root + kind[i % len(kind)] + 12 * (i // len(kind)) for i in range(len(kind) * octaves)]
    up.append(root + 12 * octaves)
    pattern = rng.choice(["up", "down", "updown"])
    seq = up if pattern == "up" else up[::-1] if pattern == "down" else up + up[-2:0:-1]
    rate = s.rate(3.0, 24.0)
    curve = s.velocity_curve()
    art = s.articulation()
    hold = rng.random() < 0.3  # broken chord held down (like a pedal without pedal)
    for i, t in enumerate(s.grid(rate)):
        dur = s.length - (t - s.start) if hold else art / rate
        s.add(t + s.jitter(), dur, seq[i % len(seq)], s.velocity(curve, t))
    s.pedal_for([s.start + i * len(seq) / rate for i in range(int(s.length * rate / len(seq)))])


def _scale(s: _Section) -> None:
    rng = s.rng
    steps = _SCALES[rng.choice(list(_SCALES))]
    hands = int(rng.integers(1, 3))  # one hand or parallel octaves/tenths
    rate = s.rate(3.0, 18.0, hands)
    n = int(s.length * rate) + 1
    span = int(np.ceil(n / len(steps))) * 12 + 16
    root = s.register(min(span, 60))
    scale = [root + 12 * o + d for o in range(8) for d in steps]
    direction = rng.choice([1, -1])
    i = 0 if direction == 1 else min(len(scale) - 1, len(steps) * 3)
    curve = s.velocity_curve()
    art = s.articulation()
    interval = int(rng.choice([12, 16, 15, -12]))
    for t in s.grid(rate):
        p = scale[i]
        if p > s.cfg.high - 4 or p < s.cfg.low + 4:
            direction = -direction
        i = int(np.clip(i + direction, 0, len(scale) - 1))
        vel = s.velocity(curve, t)
        s.add(t + s.jitter(), art / rate, p, vel)
        if hands == 2:
            s.add(t + s.jitter(), art / rate, p - interval, vel)
    s.pedal_for([])


def _run(s: _Section) -> None:
    """Fast runs: scalar or chromatic bursts near the density limit, with gaps between."""
    rng = s.rng
    steps = _SCALES[rng.choice(["major", "minor", "chromatic"])]
    rate = s.rate(14.0, 30.0)
    curve = s.velocity_curve()
    t = s.start
    end = s.start + s.length
    while t < end:
        length = int(rng.integers(6, 25))
        root = s.register(30)
        scale = [root + 12 * o + d for o in range(4) for d in steps]
        direction = rng.choice([1, -1])
        i = 0 if direction == 1 else len(scale) - 1
        for _ in range(length):
            if t >= end:
                break
            s.add(t + s.jitter(0.002), rng.uniform(0.5, 1.0) / rate, scale[i],
                  s.velocity(curve, t))
            i = int(np.clip(i + direction, 0, len(scale) - 1))
            t += 1.0 / rate
        t += rng.uniform(0.1, 0.6)
    s.pedal_for([])


def _repeated(s: _Section) -> None:
    """Repeated notes or chords (up to ~16 strikes per second per key)."""
    rng = s.rng
    size = int(rng.choice([1, 1, 2, 3]))
    rate = s.rate(3.0, 16.0, size)
    root = s.register(14)
    pitches = sorted({root + int(d) for d in [0, *rng.integers(3, 13, size=size - 1)]})
    curve = s.velocity_curve()
    art = rng.uniform(0.3, 0.85)
    for t in s.grid(rate):
        vel = s.velocity(curve, t)
        for p in pitches:
            s.add(t + s.jitter(0.002), art / rate, p, vel)
    s.pedal_for([])


def _alberti(s: _Section) -> None:
    """Left hand Alberti / broken-chord bass under a right-hand melody."""
    rng = s.rng
    lh_rate = s.rate(3.0, 12.0)
    mel_rate = s.rate(1.0, max(1.2, min(8.0, s.cfg.max_density - lh_rate)))
    bass_root = int(rng.integers(max(s.cfg.low, 36), 56))
    chord = _CHORDS[rng.choice(["major", "minor", "dom7"])]
    pattern = [chord[0], chord[2 % len(chord)], chord[1], chord[2 % len(chord)]]
    curve_l = s.velocity_curve()
    art = s.articulation()
    changes = []
    for i, t in enumerate(s.grid(lh_rate)):
        if i % 8 == 0 and i:
            bass_root += int(rng.choice([-5, -2, 0, 2, 5, 7]))
            bass_root = int(np.clip(bass_root, max(s.cfg.low, 33), 58))
            changes.append(float(t))
        vel = int(np.clip(s.velocity(curve_l, t) * 0.75, s.cfg.min_velocity, 127))
        s.add(t + s.jitter(), art / lh_rate, bass_root + pattern[i % 4], vel)
    curve_m = s.velocity_curve()
    p = int(rng.integers(64, 84))
    steps = _SCALES["major"]
    for t in s.grid(mel_rate):
        p = int(np.clip(p + rng.choice([-4, -3, -2, -1, 1, 2, 3, 5]), 60, min(100, s.cfg.high)))
        p = p - (p % 12) + min(steps, key=lambda d: abs(d - p % 12))
        s.add(t + s.jitter(), rng.uniform(0.6, 1.05) / mel_rate, p, s.velocity(curve_m, t))
    s.pedal_for(changes)


def _polyphony(s: _Section) -> None:
    """Random notes: Poisson onsets, random durations, a drifting register, wide velocities."""
    rng = s.rng
    rate = s.rate(2.0, s.cfg.max_density)
    curve = s.velocity_curve()
    centre = float(rng.uniform(40, 90))
    width = float(rng.uniform(5, 24))
    t = s.start + rng.exponential(1.0 / rate)
    while t < s.start + s.length:
        centre = float(np.clip(centre + rng.normal(0, 1.0), 30, 100))
        p = int(round(rng.normal(centre, width)))
        while not s.cfg.low <= p <= s.cfg.high:  # redraw, so no pile-up at the keyboard ends
            p = int(round(rng.normal(centre, width)))
        dur = float(np.exp(rng.uniform(np.log(0.04), np.log(2.0))))
        s.add(t, dur, p, s.velocity(curve, t))
        t += rng.exponential(1.0 / rate)
    s.pedal_for([])


_MAKERS: dict[str, Callable[[_Section], None]] = {
    "chords": _chords, "arpeggio": _arpeggio, "scale": _scale, "run": _run,
    "repeated": _repeated, "alberti": _alberti, "polyphony": _polyphony,
}


def generate_piece(seconds: float, seed: int, config: GenConfig | None = None) -> Piece:
    """Generated material filling about `seconds` of playing time (notes start before it)."""
    cfg = config or GenConfig()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x6E4E]))
    kinds = [k for k in cfg.kinds if k in _MAKERS]
    if not kinds:
        raise ValueError(f"no known kinds in {cfg.kinds!r}; choose from {KINDS}")
    weights = np.array([cfg.kind_weights.get(k, 1.0) for k in kinds], dtype=float)
    weights /= weights.sum()
    notes: list[Note] = []
    pedal: list[Pedal] = []
    used: list[str] = []
    t = float(rng.uniform(0.05, 0.3))
    while t < seconds - 0.2:
        length = min(float(rng.uniform(*cfg.section_seconds)), seconds - t)
        kind = str(rng.choice(kinds, p=weights))
        sec = _Section(rng, cfg, t, length)
        _MAKERS[kind](sec)
        notes.extend(n for n in sec.notes if n.onset < seconds)
        pedal.extend(sec.pedal)
        used.append(kind)
        t += length + float(rng.choice([0.0, rng.uniform(0.05, 0.6)]))
    notes = tidy_notes(notes, low=cfg.low, high=cfg.high)
    notes = [n for n in notes if n.onset < seconds]
    notes = limit_density(notes, cfg.max_density)
    notes = [Note(n.onset, n.offset, n.pitch,
                  int(np.clip(n.velocity, cfg.min_velocity, cfg.max_velocity))) for n in notes]
    return Piece(notes, merge_pedal(pedal, 0.05), name=f"gen-{seed}", source="generated",
                 meta={"kinds": used})
