"""Live devices for `pianolm stream`: a microphone in (sounddevice over PortAudio) and a MIDI
port out (mido over python-rtmidi), both from the `live` extra: pip install 'pianolm[live]'.

    chunks = mic_chunks()                  # float32 mono 16 kHz chunks from the default input
    port = MidiOut("pianolm")              # an existing output port, or a new virtual one
    port.send(event)                       # a stream Event -> note_on / note_off / CC64

Whatever is missing (the extra, the PortAudio library, an input device, a MIDI backend or
port) is a LiveDeviceError with a one-line message, raised when the device is opened.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from .audio import To16k
from .errors import one_line
from .stream import Event

LIVE_EXTRA = "pip install 'pianolm[live]'"
SUSTAIN_CC = 64


class LiveDeviceError(Exception):
    """A live device cannot be opened; the message is one line saying why."""


def mic_chunks(block_s: float = 0.1) -> Iterator[np.ndarray]:
    """The default input device, mono, resampled to 16 kHz: chunks of about `block_s`
    seconds, as it records (the device paces them). Opened now: LiveDeviceError if it cannot
    be."""
    try:
        import sounddevice as sd
    except ImportError:
        raise LiveDeviceError(f"mic needs the live extra: {LIVE_EXTRA}") from None
    except OSError as e:  # sounddevice imports, but PortAudio's library is not there
        raise LiveDeviceError(f"mic: the PortAudio library is missing ({one_line(e)}); on "
                              "Debian: apt install libportaudio2") from None
    try:
        rate = int(sd.query_devices(kind="input")["default_samplerate"])
        block = max(1, round(block_s * rate))
        stream = sd.InputStream(samplerate=rate, channels=1, dtype="float32", blocksize=block)
        stream.start()
    except Exception as e:  # sounddevice.PortAudioError, ValueError: no usable input device
        raise LiveDeviceError(f"mic: no usable input device ({one_line(e)})") from None
    return _recorded(stream, rate, block)


def _recorded(stream, rate: int, block: int) -> Iterator[np.ndarray]:
    resampler = To16k(rate)
    try:
        while True:
            data, _overflowed = stream.read(block)
            out = resampler.push(np.asarray(data, np.float32)[:, 0])
            if out.size:
                yield out
    finally:
        stream.stop()
        stream.close()


@contextmanager
def _c_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null for a moment: C libraries' own messages."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class MidiOut:
    """Stream events to a MIDI output port: `name` if such a port exists, else a new virtual
    port of that name where the platform's MIDI backend makes one (ALSA, CoreMIDI)."""

    def __init__(self, name: str) -> None:
        import mido

        try:
            with _c_stderr_silenced():  # libasound prints its own complaint; ours is one line
                names = mido.get_output_names()
                self.port = (mido.open_output(name) if name in names
                             else mido.open_output(name, virtual=True))
        except ImportError:
            raise LiveDeviceError(f"--midi-out needs python-rtmidi: {LIVE_EXTRA}") from None
        except Exception as e:  # no MIDI backend here (no ALSA sequencer), no virtual ports
            raise LiveDeviceError(f"--midi-out {name}: no such port, and no virtual port "
                                  f"here ({one_line(e)})") from None
        self._mido = mido

    def send(self, event: Event) -> None:
        message = self._mido.Message
        if event.kind == "note_on":
            self.port.send(message("note_on", note=event.pitch,
                                   velocity=max(1, min(127, event.velocity or 1))))
        elif event.kind == "note_off":
            self.port.send(message("note_off", note=event.pitch, velocity=0))
        elif event.kind in ("pedal_on", "pedal_off"):
            self.port.send(message("control_change", control=SUSTAIN_CC,
                                   value=127 if event.kind == "pedal_on" else 0))

    def close(self) -> None:
        self.port.close()
