"""`pianolm stream` (runtime/stream.py, runtime/cli.py): sliding windows give the offline roll
decoder's notes, events come in order and every note_on is closed, file and stdin sources
agree, memory stays flat, and bad input is one line with exit 2. No audio device is used."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pianolm.runtime.cli import main
from pianolm.runtime.kong_rolls import kong_pedals
from pianolm.runtime.manifest import load_manifest
from pianolm.runtime.metrics import evaluate
from pianolm.runtime.midi import read_midi
from pianolm.runtime.notes import Note, sort_notes
from pianolm.runtime.rolls import decode_rolls
from pianolm.runtime.stream import Event, StreamTranscriber, paced, pcm_chunks
from pianolm.runtime.transcriber import Transcriber, default_model_dir, open_backend
from tests.struck_tones import struck_tones
from tests.test_rolls_stream import _rolls

# The synthetic struck tones below are not a piano: the model needs more right context on them
# than on piano audio, so the CLI plumbing tests stream them with whole 10 s windows. The
# default geometry is checked on the dev set's piano (test_default_geometry_on_the_dev_set).
WHOLE = ["--window", "10", "--hop", "2.5", "--lookahead", "2.5"]
FAST = ["--pace", "fast", "--threads", "1", *WHOLE]


# ---------------------------------------------------------------- windowing, with a fake model


class FrameCodeBackend:
    """A stand-in encoder whose rolls at each frame are looked up by the frame's global index,
    written into the audio itself (sample i * 320 holds (i + 1) / 1e4; 0 is padding): the
    rolls any window gives for a frame are the timeline's own, so the streamed notes must be
    exactly decode_rolls' on the whole timeline, whatever the hop, lookahead and chunks."""

    def __init__(self, rolls: dict[str, np.ndarray]) -> None:
        manifest = load_manifest(default_model_dir())
        encoder = manifest.encoder
        if "pedal_frame" in rolls:  # a model with Kong's sustain-pedal rolls
            assert encoder.rolls is not None
            encoder = dataclasses.replace(encoder, rolls=dataclasses.replace(encoder.rolls,
                                                                              pedal=True))
        # no level scaling: the codes must reach the encoder as they are
        self.manifest = dataclasses.replace(manifest, input_peak=None, encoder=encoder)
        self.timeline = rolls
        self.calls = 0
        self.min_samples = 0

    @staticmethod
    def audio(frames: int, n_samples: int) -> np.ndarray:
        x = np.zeros(n_samples, np.float32)
        x[0:frames * 320:320] = (np.arange(len(x[0:frames * 320:320])) + 1) / 1e4
        return x

    segment_samples = 160000

    def encode_with_rolls(self, audio: np.ndarray, whole: bool = True):
        assert whole == (audio.shape[1] == self.segment_samples)
        self.calls += 1
        if audio.shape[1] < self.min_samples:  # as a constant-Q front end's reflect padding
            raise RuntimeError(f"Pad reflect: pre-pad exceeds maximum allowed for {audio.shape}")
        assert audio.shape[0] == 1 and audio.shape[1] % 320 == 0
        codes = np.round(np.append(audio[0, ::320], 0.0) * 1e4).astype(int) - 1  # frames + 1
        out = {}
        for key in self.timeline:
            roll = np.zeros((len(codes), self.timeline[key].shape[1]), np.float32)
            real = codes >= 0
            roll[real] = self.timeline[key][codes[real]]
            out[key] = roll[None]
        return None, out


def _notes(events: list[Event]) -> list[Note]:
    """Pair each note_on with its note_off (checking they pair up)."""
    sounding: dict[int, Event] = {}
    notes = []
    for e in events:
        if e.kind == "note_on":
            assert e.pitch not in sounding, f"{e.pitch} struck again before its note_off"
            sounding[e.pitch] = e
        else:
            on = sounding.pop(e.pitch)
            assert e.time >= on.time
            notes.append(Note(on.time, e.time, e.pitch, on.velocity))
    assert not sounding, "note_on without note_off"
    return sort_notes(notes)


def _stream(st: StreamTranscriber, audio: np.ndarray, chunk: int) -> list[Event]:
    events = []
    for i in range(0, len(audio), chunk):
        events += st.push(audio[i:i + chunk])
    return events + st.finish()


@pytest.mark.parametrize("hop, lookahead", [(2.5, 2.5), (1.0, 0.5), (4.0, 0.0), (0.02, 9.98)])
@pytest.mark.parametrize("n_samples", [16000 * 23 + 123, 16000 * 3, 160000, 320 * 1000])
def test_windows_give_the_whole_timelines_notes(hop, lookahead, n_samples):
    frames = n_samples // 320 + 1
    rolls = _rolls(np.random.default_rng(n_samples), frames)
    if n_samples % 320 == 0:  # the last frame lies past the audio: no window sees it
        rolls = {k: np.concatenate([r[:-1], np.zeros((1, 88), np.float32)])
                 for k, r in rolls.items()}
    backend = FrameCodeBackend(rolls)
    cfg = backend.manifest.encoder.rolls.thresholds
    whole = decode_rolls(rolls, 50, cfg)
    assert len(whole) > 5
    audio = FrameCodeBackend.audio(frames, n_samples)
    for chunk in (n_samples, 1601, 16000):
        events = _stream(StreamTranscriber(backend, hop, lookahead, window_s=None), audio,
                         chunk)
        assert _notes(events) == whole, (hop, lookahead, chunk)


@pytest.mark.parametrize("window, hop, lookahead", [(3.0, 0.25, 0.5), (2.0, 1.0, 1.0),
                                                   (0.5, 0.1, 0.2)])
def test_shorter_windows_give_the_whole_timelines_notes(window, hop, lookahead):
    """--window: encoder runs on less audio than a segment (the end-aligned last one too)."""
    n_samples = 16000 * 7 + 1000
    frames = n_samples // 320 + 1
    rolls = _rolls(np.random.default_rng(3), frames)
    backend = FrameCodeBackend(rolls)
    whole = decode_rolls(rolls, 50, backend.manifest.encoder.rolls.thresholds)
    audio = FrameCodeBackend.audio(frames, n_samples)
    st = StreamTranscriber(backend, hop, lookahead, window_s=window)
    assert _notes(_stream(st, audio, 1601)) == whole
    assert st.plan.window == round(50 * window)


def test_events_are_ordered_and_memory_is_flat():
    frames = 50 * 120 + 1  # two minutes; the last frame lies past the audio
    rolls = _rolls(np.random.default_rng(7), frames)
    rolls = {k: np.concatenate([r[:-1], np.zeros((1, 88), np.float32)]) for k, r in rolls.items()}
    backend = FrameCodeBackend(rolls)
    st = StreamTranscriber(backend, 1.0, 1.0, window_s=None)
    audio = FrameCodeBackend.audio(frames, 320 * (frames - 1))
    events, sizes = [], []
    for i in range(0, len(audio), 4000):
        batch = st.push(audio[i:i + 4000])
        assert [(e.time, e.kind != "note_off") for e in batch] == sorted(
            (e.time, e.kind != "note_off") for e in batch)
        events += batch
        sizes.append(st._audio.size)
    events += st.finish()
    assert max(sizes) <= 160000  # the last window's audio, whatever the stream's length
    assert len(st.rolls._buf["onset"]) <= 10
    onsets = [e.time for e in events if e.kind == "note_on"]
    assert onsets == sorted(onsets)  # note_ons in onset order across the whole stream
    assert _notes(events) == decode_rolls(rolls, 50, st.rolls.cfg)
    assert backend.calls == 119 + 1  # a pass per hop whose lookahead came, one at the end


def _pedal_rolls(rng: np.random.Generator, frames: int, held_at_end: bool
                 ) -> dict[str, np.ndarray]:
    """Presses of random lengths, some ended by an offset peak, some by the frame roll's
    absence alone; with held_at_end the last press lasts to the end."""
    frame = np.zeros(frames, np.float32)
    offset = np.zeros(frames, np.float32)
    t = 5
    while t < frames:
        down, up = int(rng.integers(10, 200)), int(rng.integers(3, 80))
        frame[t:t + down] = rng.uniform(0.6, 1.0)
        end = t + down
        if end + 2 < frames and rng.random() < 0.6:  # an offset peak (a triangle) at the end
            offset[end - 2:end + 3] = np.float32([0.2, 0.5, 0.9, 0.4, 0.1])[:len(
                offset[end - 2:end + 3])]
        t = end + up
    if held_at_end:
        frame[-300:] = 0.8
        offset[-300:] = 0.0
    return {"pedal_onset": np.zeros((frames, 1), np.float32),
            "pedal_offset": offset[:, None], "pedal_frame": frame[:, None]}


@pytest.mark.parametrize("held_at_end", [False, True])
@pytest.mark.parametrize("hop, lookahead", [(2.5, 2.5), (0.1, 0.0)])
def test_pedal_events_are_kongs_presses(hop, lookahead, held_at_end):
    n_samples = 16000 * 40 + 77
    frames = n_samples // 320 + 1
    rng = np.random.default_rng(11)
    rolls = {**_rolls(rng, frames), **_pedal_rolls(rng, frames, held_at_end)}
    backend = FrameCodeBackend(rolls)
    cfg = backend.manifest.encoder.rolls.thresholds
    presses = kong_pedals(rolls, 50, cfg)
    assert len(presses) > 10
    events = _stream(StreamTranscriber(backend, hop, lookahead, window_s=None),
                     FrameCodeBackend.audio(frames, n_samples), 3200)
    pedal = [e for e in events if e.pitch is None]
    got = [t for e in pedal for t in [e.time]]  # down, up, down, up, ...
    assert [e.kind for e in pedal] == ["pedal_on", "pedal_off"] * (len(got) // 2)
    if held_at_end:  # Kong drops a press still down at the end; a live stream closes it
        assert got[-2:] == pytest.approx([(frames - 300) / 50, (frames - 1) / 50])
        got = got[:-2]
    assert got == pytest.approx([t for press in presses for t in press])
    assert _notes([e for e in events if e.pitch is not None]) == decode_rolls(rolls, 50, cfg)
    line = next(e for e in events if e.kind == "pedal_on").to_json()
    assert set(line) == {"type", "onset", "emitted_at"}


def test_bad_hop_and_lookahead_are_refused():
    backend = FrameCodeBackend(_rolls(np.random.default_rng(0), 10))
    for hop, lookahead in [(0, 1), (8, 3), (1, -1), (float("nan"), 1)]:
        with pytest.raises(ValueError, match="hop"):
            StreamTranscriber(backend, hop, lookahead)
    for window in (10.5, 1.0, float("inf")):  # longer than the model's segment; < hop + R
        with pytest.raises(ValueError, match="window|hop"):
            StreamTranscriber(backend, 0.5, 1.0, window_s=window)
    # a window the encoder cannot run on (here: under 1.5 s) is refused at once, in one line
    backend.min_samples = 24000
    with pytest.raises(ValueError, match="window 1.2 s: this model's encoder cannot run"):
        StreamTranscriber(backend, 0.2, 0.4, window_s=1.2)
    assert StreamTranscriber(backend, 0.2, 0.4, window_s=1.6).plan.window == 80


def test_paced_waits_for_the_audio_clock():
    now = [100.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    chunks = [np.zeros(1600, np.float32)] * 3  # 0.1 s each
    out = list(paced(iter(chunks), clock=lambda: now[0], sleep=sleep))
    assert len(out) == 3 and slept == pytest.approx([0.1, 0.1, 0.1])


def test_pcm_chunks_read_s16le_stereo_at_any_rate():
    x = (np.sin(np.arange(44100) / 10) * 20000).astype("<i2")
    stereo = np.stack([x, x // 2], axis=1)  # interleaved by row
    data = io.BytesIO(stereo.tobytes() + b"\x01")  # a stray byte: a partial frame, dropped
    out = np.concatenate(list(pcm_chunks(data.read, 44100, 2, "s16le", block_s=0.03)))
    assert len(out) == 16000
    mono = (x.astype(np.float32) / 32768 + (x // 2).astype(np.float32) / 32768) / 2
    assert np.max(np.abs(out)) == pytest.approx(np.max(np.abs(mono)), rel=0.02)


# ---------------------------------------------------------------- the shipped model, the CLI


@pytest.fixture(scope="module")
def piece(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """14 s of struck harmonic tones at 22.05 kHz stereo, written as 16-bit PCM."""
    rate = 22050
    mono = struck_tones(14.0, seed=5, rate=rate, harmonics=(1, 2, 3))
    stereo = np.stack([mono, 0.5 * mono], axis=1)
    pcm = np.round(stereo * 32767).astype("<i2")
    path = tmp_path_factory.mktemp("stream") / "piece.wav"
    sf.write(path, pcm, rate, subtype="PCM_16")
    return path, pcm


def _run(capsys, *argv: str) -> tuple[int, list[dict], str]:
    code = main(["stream", *argv])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def _as_events(lines: list[dict]) -> list[Event]:
    return [Event(d["type"], d.get("onset", d.get("offset")), d["pitch"], d.get("velocity"),
                  d["emitted_at"]) for d in lines]


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pianolm: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def file_events(piece, tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("midi") / "piece.mid"
    capture = io.StringIO()
    saved = sys.stdout
    sys.stdout = capture
    try:
        assert main(["stream", str(piece[0]), *FAST, "-o", str(out)]) == 0
    finally:
        sys.stdout = saved
    return [json.loads(line) for line in capture.getvalue().splitlines()], out


def test_file_source_matches_the_offline_transcription(piece, file_events):
    lines, midi = file_events
    assert {d["type"] for d in lines} == {"note_on", "note_off"}  # no pedal in this model
    assert all(d["emitted_at"] >= 0 for d in lines)
    emitted = [d["emitted_at"] for d in lines]
    onsets = [d["onset"] for d in lines if d["type"] == "note_on"]
    assert emitted == sorted(emitted) and onsets == sorted(onsets)
    streamed = _notes(_as_events(lines))
    offline = Transcriber(decoder="rolls", threads=1).transcribe(str(piece[0])).notes
    assert len(offline) >= 20
    scores = evaluate(streamed, offline)
    assert scores["onset_f"] >= 0.9, scores
    # -o: the whole performance, the events' notes
    written = read_midi(midi)
    assert [(n.pitch, n.velocity) for n in written] == [(n.pitch, n.velocity) for n in streamed]
    assert [n.onset for n in written] == pytest.approx([n.onset for n in streamed], abs=0.006)


def _strip(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in d.items() if k != "emitted_at"} for d in lines]


def test_default_geometry_on_the_dev_set(devset, capsys):
    """`pianolm stream` with its default window, hop and lookahead against the offline roll
    transcription of the same piano recording (benchmarks/stream_latency.py measures all)."""
    clip = sorted(devset.glob("dev_*.wav"))[0]
    code, lines, err = _run(capsys, str(clip), "--pace", "fast", "--threads", "1")
    assert code == 0, err
    offline = Transcriber(decoder="rolls", threads=1).transcribe(str(clip)).notes
    assert evaluate(_notes(_as_events(lines)), offline)["onset_f"] >= 0.97


def test_stdin_s16le_gives_the_files_events(piece, file_events):
    """Through a real pipe: the same samples as raw PCM give the same events."""
    path, pcm = piece
    proc = subprocess.run([sys.executable, "-m", "pianolm.runtime.cli", "stream", "-",
                           "--rate", "22050", "--channels", "2", "--sample-format", "s16le",
                           "--threads", "1", *WHOLE], input=pcm.tobytes(), capture_output=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert _strip(lines) == _strip(file_events[0])


def test_stdin_f32le_through_main(piece, tmp_path, capsys, monkeypatch):
    path, pcm = piece
    floats = (pcm.astype(np.float32) / 32768).astype("<f4")
    float_wav = tmp_path / "piece_f32.wav"
    sf.write(float_wav, floats, 22050, subtype="FLOAT")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(floats.tobytes())))
    code, lines, err = _run(capsys, "-", "--rate", "22050", "--channels", "2",
                            "--sample-format", "f32le", "--threads", "1", *WHOLE, "--hop",
                            "5")
    assert code == 0, err
    code, from_file, err = _run(capsys, str(float_wav), *FAST, "--hop", "5")
    assert code == 0, err
    assert _strip(lines) == _strip(from_file) and lines


def test_ctrl_c_flushes_open_notes_and_writes_the_midi(piece, tmp_path, capsys, monkeypatch):
    import pianolm.runtime.stream as stream

    real = stream.file_chunks

    def interrupted(path, block_s=0.1):
        for i, chunk in enumerate(real(path, block_s)):
            if i == 60:  # 6 s in
                raise KeyboardInterrupt
            yield chunk

    monkeypatch.setattr(stream, "file_chunks", interrupted)
    out = tmp_path / "cut.mid"
    code, lines, err = _run(capsys, str(piece[0]), *FAST, "-o", str(out))
    assert code == 0, err
    notes = _notes(_as_events(lines))
    assert notes and max(n.offset for n in notes) <= 6.1
    assert len(read_midi(out)) == len(notes)


class FakeInput:
    """A sounddevice.InputStream stand-in that records `audio` [n] and then is stopped by
    Ctrl-C, as a live microphone is."""

    def __init__(self, audio: np.ndarray, **options) -> None:
        self.audio, self.options, self.at, self.closed = audio, options, 0, False

    def start(self) -> None:
        pass

    def read(self, n: int) -> tuple[np.ndarray, bool]:
        if self.at >= len(self.audio):
            raise KeyboardInterrupt
        block = self.audio[self.at:self.at + n]
        self.at += n
        return block[:, None].astype(np.float32), False

    def stop(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_mic_streams_what_the_device_records(piece, file_events, capsys, monkeypatch):
    """`pianolm stream mic` on a device recording the piece: the file's notes."""
    path, pcm = piece
    mono = (pcm.astype(np.float32) / 32768).mean(axis=1)
    streams = []

    def input_stream(**options):
        streams.append(FakeInput(mono, **options))
        return streams[-1]

    monkeypatch.setitem(sys.modules, "sounddevice", types.SimpleNamespace(
        query_devices=lambda kind: {"default_samplerate": 22050.0}, InputStream=input_stream))
    code, lines, err = _run(capsys, "mic", "--threads", "1", *WHOLE)
    assert code == 0, err
    assert streams[0].options["samplerate"] == 22050 and streams[0].closed
    # Ctrl-C ends the recording without the resampler's last milliseconds, so the last,
    # end-aligned window sits a frame from the file's: a note near the end may differ
    from_file = _notes(_as_events(file_events[0]))
    assert evaluate(_notes(_as_events(lines)), from_file)["onset_f"] >= 0.97


@pytest.mark.parametrize("device, says", [
    (None, "mic needs the live extra: pip install 'pianolm[live]'"),
    (types.SimpleNamespace(query_devices=lambda kind: (_ for _ in ()).throw(
        ValueError("No input device matching"))), "mic: no usable input device"),
])
def test_mic_without_the_extra_or_a_device_is_one_line(capsys, monkeypatch, device, says):
    monkeypatch.setitem(sys.modules, "sounddevice", device)
    code, lines, err = _run(capsys, "mic")
    assert code == 2 and not lines
    assert says in _one_error_line(err)


class FakePort:
    def __init__(self) -> None:
        self.messages, self.closed = [], False

    def send(self, message) -> None:
        self.messages.append(message)

    def close(self) -> None:
        self.closed = True


def test_midi_out_sends_every_event(piece, file_events, capsys, monkeypatch):
    import mido

    port = FakePort()
    monkeypatch.setattr(mido, "get_output_names", lambda: ["synth"])
    monkeypatch.setattr(mido, "open_output", lambda name, virtual=False: port)
    code, lines, err = _run(capsys, str(piece[0]), *FAST, "--midi-out", "synth")
    assert code == 0, err
    sent = [(m.type, m.note, m.velocity) for m in port.messages]
    assert sent == [(d["type"], d["pitch"], d.get("velocity", 0)) for d in lines]
    assert port.closed


def test_midi_out_without_a_port_is_one_line(piece, capsys, monkeypatch):
    import mido

    def refuse(name, virtual=False):
        raise OSError("ALSA: cannot open the sequencer")

    monkeypatch.setattr(mido, "get_output_names", lambda: [])
    monkeypatch.setattr(mido, "open_output", refuse)
    code, lines, err = _run(capsys, str(piece[0]), *FAST, "--midi-out", "synth")
    assert code == 2 and not lines
    assert "--midi-out synth: no such port, and no virtual port here" in _one_error_line(err)


@pytest.mark.parametrize("argv, says", [
    (["/no/such.wav"], "not found"),
    (["{piece}", "--rate", "8000"], "--rate"),
    (["{piece}", "--hop", "9"], "hop"),
    (["{piece}", "--window", "20"], "window"),
    (["{piece}", "--decoder", "lm"], "not built yet"),
    (["-", "--channels", "0"], "--channels"),
    (["{piece}", "-o", "{piece}"], "is an input"),
    (["{piece}", "--threads", "0"], "--threads"),
])
def test_bad_source_or_flags_is_one_line_and_exit_2(piece, capsys, argv, says):
    code, lines, err = _run(capsys, *[a.format(piece=piece[0]) for a in argv])
    assert code == 2 and not lines
    assert says in _one_error_line(err)


def test_empty_stdin_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    code, lines, err = _run(capsys, "-", "--threads", "1")
    assert code == 2 and not lines
    assert "no audio" in _one_error_line(err)


def test_backend_opened_for_rolls_only_streams():
    backend = open_backend("cpu", default_model_dir(), threads=1, decoder="rolls")
    st = StreamTranscriber(backend)
    assert st.push(np.zeros(16000, np.float32)) == []  # 1 s: no window is complete yet
    assert st.finish() == []  # silence: no notes
