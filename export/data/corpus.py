"""music21 corpus pieces as humanised piano performances.

    paths = list_pieces("train")                   # paths inside the music21 corpus
    piece = corpus_piece(paths[0], seed=3)          # whole piece, humanised
    clip = corpus_clip(seconds=20.0, seed=3)        # a random window of a random train piece

Splits (`split_of`): the solo-piano pieces of the corpus (Joplin, Clara Schumann, Beach,
Mozart K545, C. P. E. Bach, Schoenberg; also Chopin's mazurka) and the Bach chorale of the
public dev set (BWV 66.6) are "heldout": never rendered for training or validation. Of the
rest, a fixed 5 % (by a hash of the path) is "validation" and the others are "train".
Monophonic folk collections, lead sheets, Roman-numeral analyses and demos are not used.

Scores are parsed with music21 once and cached as JSON (score time in quarter notes) under
$PIANOLM_CACHE/corpus (default ~/.cache/pianolm/corpus). Humanising: tempo from the score's
metronome marks (100 bpm if none) times a random factor, smooth rubato, onset jitter and chord
asynchrony, a phrase-level dynamic curve with voice emphasis and a random velocity curve,
articulation (legato .. detached), transposition (octave-folded into the keyboard), and
sustain pedal (none, or legato changes every bar / half bar / beat group).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from pianolm.runtime.notes import Note

from .common import Pedal, Piece, cache_root, crop, merge_pedal, tidy_notes

CORPUS_EXTENSIONS = (".mxl", ".xml", ".musicxml", ".krn", ".mid", ".midi")

# Solo-piano pieces of the music21 corpus (and the dev set's chorale): never trained on.
HELD_OUT = (
    "joplin/",            # Maple Leaf Rag
    "schumann_clara/",    # polonaises, Op. 17 trio
    "beach/",             # Prayer of a Tired Child (dev_03)
    "mozart/k545/",       # Sonata K. 545
    "cpebach/",           # Sonata H. 186 (dev_02)
    "schoenberg/",        # Op. 19 (dev_04)
    "chopin/",            # Mazurka Op. 6 No. 2: solo piano too
    "bach/bwv66.6.",      # the dev set's chorale (dev_01)
)
# Collections worth rendering (polyphonic vocal/chamber music played on the piano).
TRAIN_DIRS = (
    "bach", "palestrina", "monteverdi", "beethoven", "haydn", "mozart", "corelli", "handel",
    "josquin", "trecento", "ciconia", "schumann_robert", "schubert", "weber", "webern",
    "verdi", "johnson_j_r", "liliuokalani", "luca", "lusitano",
)
# Sampling weight per collection for corpus_clip (the corpus is dominated by Palestrina).
GROUP_WEIGHTS = {"bach": 3.0, "palestrina": 2.0, "monteverdi": 1.0, "trecento": 0.7,
                 "beethoven": 1.0, "haydn": 0.7, "mozart": 0.8}
VALIDATION_PERCENT = 5
_CACHE_VERSION = 1


def corpus_root() -> Path:
    """The folder of music21's bundled corpus (raises ImportError without music21)."""
    import music21

    return Path(music21.__file__).parent / "corpus"


def music21_available() -> bool:
    try:
        import music21  # noqa: F401
    except ImportError:
        return False
    return True


def is_held_out(path: str) -> bool:
    p = path.replace(os.sep, "/").lstrip("./")
    return any(p.startswith(prefix) for prefix in HELD_OUT)


def split_of(path: str) -> str:
    """'heldout', 'validation' or 'train' for a path inside the corpus ('bach/bwv1.6.mxl')."""
    if is_held_out(path):
        return "heldout"
    digest = hashlib.sha1(path.replace(os.sep, "/").encode()).digest()
    return "validation" if digest[0] * 100 // 256 < VALIDATION_PERCENT else "train"


@lru_cache(maxsize=1)
def _all_pieces() -> tuple[str, ...]:
    root = corpus_root()
    out = []
    for folder in sorted(set(TRAIN_DIRS) | {h.split("/")[0] for h in HELD_OUT}):
        base = root / folder
        if not base.is_dir():
            continue
        for f in sorted(base.rglob("*")):
            if f.suffix.lower() in CORPUS_EXTENSIONS and f.is_file():
                out.append(f.relative_to(root).as_posix())
    return tuple(out)


def list_pieces(split: str | None = None) -> list[str]:
    """Corpus paths of usable pieces, optionally only those of one split."""
    return [p for p in _all_pieces() if split is None or split_of(p) == split]


# ------------------------------------------------------------------------------------- scores


@dataclass
class ScoreNotes:
    """A score in quarter notes: what the cache stores."""

    path: str
    notes: list[tuple[float, float, int, int]]  # (onset ql, duration ql, pitch, part index)
    bars: list[float]  # bar starts (ql)
    tempi: list[tuple[float, float]]  # (start ql, quarter notes per minute)
    n_parts: int = 1
    meta: dict = field(default_factory=dict)

    @property
    def length(self) -> float:
        return max((on + d for on, d, _, _ in self.notes), default=0.0)


def cache_dir() -> Path:
    return cache_root() / "corpus"


def _parse_score(path: str) -> ScoreNotes:
    import music21

    score = music21.converter.parse(str(corpus_root() / path))
    parts = list(getattr(score, "parts", [])) or [score]
    notes: list[tuple[float, float, int, int]] = []
    for k, part in enumerate(parts):
        try:
            part = part.stripTies()
        except Exception:  # noqa: BLE001 - some encodings refuse; keep the tied notes then
            pass
        for el in part.flatten().getElementsByClass(["Note", "Chord"]):
            dur = float(el.duration.quarterLength)
            if dur <= 0:  # grace notes
                continue
            on = float(el.offset)
            for p in el.pitches:
                notes.append((on, dur, int(p.midi), k))
    bars: list[float] = []
    try:
        bars = sorted({float(m.offset) for m in parts[0].getElementsByClass("Measure")})
    except Exception:  # noqa: BLE001
        bars = []
    tempi: list[tuple[float, float]] = []
    try:
        for start, _end, mm in score.metronomeMarkBoundaries():
            qpm = mm.getQuarterBPM()
            if qpm and 20 <= qpm <= 400:
                tempi.append((float(start), float(qpm)))
    except Exception:  # noqa: BLE001
        tempi = []
    notes.sort()
    return ScoreNotes(path, notes, bars, tempi, len(parts),
                      {"music21": music21.__version__})


def load_score(path: str, use_cache: bool = True) -> ScoreNotes:
    """The notes of a corpus piece in score time; parsed once, then read from the cache."""
    key = hashlib.sha1(f"{_CACHE_VERSION}:{path}".encode()).hexdigest()[:16]
    cached = cache_dir() / f"{key}.json"
    if use_cache and cached.is_file():
        try:
            d = json.loads(cached.read_text())
            return ScoreNotes(d["path"], [tuple(x) for x in d["notes"]], d["bars"],
                              [tuple(x) for x in d["tempi"]], d["n_parts"], d.get("meta", {}))
        except (ValueError, KeyError, TypeError):
            pass
    score = _parse_score(path)
    if use_cache:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(asdict(score)))
            os.replace(tmp, cached)
        except OSError:
            pass
    return score


# ---------------------------------------------------------------------------------- humanise


@dataclass
class HumaniseConfig:
    tempo_scale: tuple[float, float] = (0.8, 1.25)
    rubato: float = 0.05           # sd of the log-tempo random walk per bar
    onset_jitter: float = 0.010    # s, per onset group
    chord_spread: float = 0.006    # s, per note within a group
    articulation: tuple[float, float] = (0.75, 1.0)  # sounding fraction of the written length
    velocity_centre: tuple[float, float] = (35.0, 85.0)
    velocity_phrase: float = 15.0  # amplitude of the slow dynamic curve
    velocity_noise: float = 6.0
    velocity_gamma: tuple[float, float] = (0.75, 1.35)
    transpose: tuple[int, int] = (-6, 6)
    pedal_probability: float = 0.6


def _time_map(score: ScoreNotes, rng: np.random.Generator, cfg: HumaniseConfig):
    """Score time (ql) -> seconds: metronome marks x a random factor x smooth rubato."""
    tempi = sorted(score.tempi) or [(0.0, 100.0)]
    factor = float(rng.uniform(*cfg.tempo_scale))
    end = score.length + 8.0
    grid = np.arange(0.0, end + 1.0, 1.0)  # one point per quarter note
    qpm = np.full(grid.shape, tempi[0][1])
    for start, value in tempi:
        qpm[grid >= start] = value
    # keep the tempo sensible on piano, whatever the marking (e.g. half-note = 40 in masses)
    qpm = np.clip(qpm * factor, 40.0, 220.0)
    walk = np.cumsum(rng.normal(0.0, cfg.rubato / 2.0, size=grid.shape))
    walk -= np.convolve(walk, np.ones(9) / 9, mode="same") * 0.5
    qpm = qpm * np.exp(np.clip(walk, -0.15, 0.15))
    seconds = np.concatenate([[0.0], np.cumsum(60.0 / qpm[:-1])])

    def to_seconds(ql: np.ndarray | float) -> np.ndarray:
        return np.interp(ql, grid, seconds)

    return to_seconds, factor


def humanise(score: ScoreNotes, seed: int, config: HumaniseConfig | None = None) -> Piece:
    """A humanised performance of a score (all parts on one piano)."""
    cfg = config or HumaniseConfig()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC0B5]))
    to_seconds, factor = _time_map(score, rng, cfg)
    if not score.notes:
        return Piece([], [], name=score.path, source=f"corpus:{score.path}")
    arr = np.array(score.notes, dtype=float)
    on_ql, dur_ql, pitch = arr[:, 0], arr[:, 1], arr[:, 2].astype(int)
    shift = int(rng.integers(cfg.transpose[0], cfg.transpose[1] + 1))
    pitch = pitch + shift

    # timing: one jitter per onset group, a small spread within the group
    groups, group_idx = np.unique(np.round(on_ql, 4), return_inverse=True)
    group_jitter = rng.normal(0.0, cfg.onset_jitter, size=len(groups))
    onset = to_seconds(on_ql) + group_jitter[group_idx] + rng.normal(0, cfg.chord_spread,
                                                                    size=len(on_ql))
    art = rng.uniform(*cfg.articulation)
    written_end = to_seconds(on_ql + dur_ql)
    offset = onset + (written_end - to_seconds(on_ql)) * np.clip(
        art + rng.normal(0, 0.05, size=len(on_ql)), 0.3, 1.05)
    offset = np.maximum(offset, onset + 0.04)

    # dynamics: a level, a slow phrase curve, voice emphasis, noise, a velocity curve
    centre = rng.uniform(*cfg.velocity_centre)
    t_end = max(float(onset.max()), 1.0)
    knots = np.linspace(0.0, t_end, max(2, int(t_end / 4.0) + 2))
    phrase = np.interp(onset, knots, rng.normal(0, cfg.velocity_phrase, size=len(knots)))
    top = np.zeros(len(on_ql), dtype=bool)
    bottom = np.zeros(len(on_ql), dtype=bool)
    for g in range(len(groups)):
        members = np.flatnonzero(group_idx == g)
        top[members[np.argmax(pitch[members])]] = True
        bottom[members[np.argmin(pitch[members])]] = True
    vel = centre + phrase + 8.0 * top + 3.0 * bottom + rng.normal(0, cfg.velocity_noise,
                                                                 size=len(on_ql))
    gamma = rng.uniform(*cfg.velocity_gamma)
    vel = 127.0 * (np.clip(vel, 1, 127) / 127.0) ** gamma

    shift_t = float(min(0.0, onset.min()))
    notes = [Note(float(a - shift_t), float(b - shift_t), int(p), int(round(v)))
             for a, b, p, v in zip(onset, offset, pitch, vel, strict=True)]
    notes = tidy_notes(notes)

    pedal: list[Pedal] = []
    mode = "none"
    if rng.random() < cfg.pedal_probability and score.bars:
        mode = str(rng.choice(["bar", "half", "two-bars"]))
        bars = np.array(score.bars + [score.length], dtype=float)
        if mode == "half":
            bars = np.sort(np.concatenate([bars, (bars[:-1] + bars[1:]) / 2]))
        elif mode == "two-bars":
            bars = bars[::2]
        times = to_seconds(bars) - shift_t
        for a, b in zip(times[:-1], times[1:], strict=True):
            down = a + rng.uniform(0.05, 0.2)   # legato pedalling: after the new harmony
            up = b + rng.uniform(-0.02, 0.06)
            if up - down > 0.15:
                pedal.append((float(down), float(up)))
    meta = {"tempo_factor": round(factor, 3), "transpose": shift, "articulation": round(art, 3),
            "velocity_centre": round(float(centre), 1), "velocity_gamma": round(float(gamma), 3),
            "pedal": mode}
    return Piece(notes, merge_pedal(pedal, 0.05), name=Path(score.path).stem,
                 source=f"corpus:{score.path}", meta=meta)


def corpus_piece(path: str, seed: int, config: HumaniseConfig | None = None,
                 allow_held_out: bool = False) -> Piece:
    """A humanised performance of one corpus piece (refuses held-out pieces unless told)."""
    if is_held_out(path) and not allow_held_out:
        raise ValueError(f"{path} is held out (solo piano / dev set): not for training")
    return humanise(load_score(path), seed, config)


def corpus_clip(seconds: float, seed: int, split: str = "train",
                config: HumaniseConfig | None = None, attempts: int = 8) -> Piece:
    """A random `seconds`-long window of a random piece of `split` ('train' or 'validation').

    Collections are weighted (GROUP_WEIGHTS) so that Palestrina does not crowd out the rest.
    Pieces that fail to parse or have no notes in the window are skipped (up to `attempts`).
    """
    if split == "heldout":
        raise ValueError("held-out pieces are not for training")
    pieces = list_pieces(split)
    if not pieces:
        raise RuntimeError(f"no music21 corpus pieces in split {split!r}")
    groups: dict[str, list[str]] = {}
    for p in pieces:
        groups.setdefault(p.split("/")[0], []).append(p)
    names = sorted(groups)
    w = np.array([GROUP_WEIGHTS.get(g, 0.4) for g in names])
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC11F]))
    last_error: Exception | None = None
    for _ in range(attempts):
        group = groups[names[rng.choice(len(names), p=w / w.sum())]]
        path = group[int(rng.integers(len(group)))]
        try:
            piece = corpus_piece(path, int(rng.integers(2**31)), config)
        except Exception as e:  # noqa: BLE001 - a corpus file music21 cannot read
            last_error = e
            continue
        if not piece.notes:
            continue
        latest = max(0.0, piece.notes[-1].onset - seconds * 0.5)
        start = float(rng.uniform(0.0, latest)) if latest > 0 else 0.0
        start = max(0.0, min(start, piece.notes[-1].onset) - 0.05)
        first = next((n.onset for n in piece.notes if n.onset >= start), start)
        start = max(0.0, first - float(rng.uniform(0.05, 0.4)))
        clip = crop(piece, start, seconds)
        if clip.notes:
            return clip
    raise RuntimeError(f"no usable corpus clip after {attempts} attempts ({last_error})")
