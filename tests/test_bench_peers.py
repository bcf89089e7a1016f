"""export/bench/peers.py without the peers: fake systems through the timing, scoring and JSON
path; the skip (with the install hint) when a peer's package is missing; the peers' note
conversions; torchaudio imported without its CUDA-only extension."""

from __future__ import annotations

import json
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("mir_eval")
pytest.importorskip("torch")  # export/bench's runner (machine, git) is on the torch side

from pianolm.export.bench import peers  # noqa: E402
from pianolm.runtime.metrics import METRICS, score_notes  # noqa: E402
from pianolm.runtime.midi import write_notes_tsv  # noqa: E402
from pianolm.runtime.notes import Note  # noqa: E402

REF = {"a": [Note(0.5, 1.0, 60, 80), Note(1.0, 1.5, 64, 70), Note(1.5, 2.0, 67, 90)],
       "b": [Note(0.2, 0.9, 48, 50), Note(1.1, 1.9, 72, 100)]}
SECONDS = {"a": 2.0, "b": 3.0}


@pytest.fixture
def devset(tmp_path: Path) -> Path:
    for name, notes in REF.items():
        sf.write(tmp_path / f"{name}.wav", np.zeros(int(SECONDS[name] * 16000), np.float32),
                 16000)
        write_notes_tsv(notes, tmp_path / f"{name}.tsv")
    return tmp_path


@dataclass
class FakePeer:
    """Answers each clip with its reference notes, less the first `drop`."""

    name: str
    drop: int = 0
    threads: int | None = None
    calls: list[str] = field(default_factory=list)

    def load(self, threads: int) -> dict:
        self.threads = threads
        return {"package": "fake", "version": "0"}

    def transcribe(self, audio: Path) -> list[Note]:
        self.calls.append(audio.stem)
        return REF[audio.stem][self.drop:]


def test_fake_peers_are_timed_scored_and_reported(devset):
    perfect, partial = FakePeer("perfect"), FakePeer("partial", drop=1)
    report = peers.run_peers(devset, threads=3, peers=[perfect, partial], log=lambda s: None)
    json.dumps(report)  # plain JSON all the way down

    assert report["schema"] == peers.SCHEMA and report["threads"] == 3
    assert report["clips"] == ["a", "b"]
    assert perfect.threads == partial.threads == 3
    assert perfect.calls == ["a", "a", "b"]  # one warm-up on the first clip, then each clip
    by_name = {s["name"]: s for s in report["systems"]}
    assert [s["name"] for s in report["systems"]] == ["perfect", "partial"]

    ok = by_name["perfect"]
    assert ok["status"] == "ok" and ok["reason"] is None and ok["package"] == "fake"
    assert [c["audio_s"] for c in ok["clips"]] == [2.0, 3.0]
    for m in METRICS:
        assert ok["mean"][f"{m}_f"] == 1.0

    part = by_name["partial"]
    for clip in part["clips"]:
        expected = score_notes(REF[clip["name"]][1:], REF[clip["name"]])
        assert clip["scores"] == pytest.approx(expected)
        assert clip["notes"] == len(REF[clip["name"]]) - 1
        assert clip["rtf"] == pytest.approx(clip["wall_s"] / clip["audio_s"], abs=1e-4)
    assert part["mean"]["onset_f"] == pytest.approx(
        np.mean([c["scores"]["onset_f"] for c in part["clips"]]))
    assert part["mean"]["onset_f"] < 1.0
    wall = sum(c["wall_s"] for c in part["clips"])
    assert part["mean"]["rtf"] == pytest.approx(wall / 5.0, abs=1e-4)

    table = peers.format_table(report).splitlines()
    assert len(table) == 3 and table[1].split()[0] == "perfect"
    assert table[1].split()[2:] == ["1.000", "1.000", "1.000"]


def test_missing_peers_are_skipped_with_the_install_hint(devset, monkeypatch, tmp_path):
    # None in sys.modules makes `import x` fail as if x were not installed.
    monkeypatch.setitem(sys.modules, "transkun", None)
    monkeypatch.setitem(sys.modules, "basic_pitch", None)
    out = tmp_path / "out" / "peers.json"
    assert peers.main(["--data", str(devset), "--json", str(out),
                       "--systems", "transkun", "basic-pitch"]) == 0

    report = json.loads(out.read_text())
    assert report["command"].startswith("python -m pianolm.export.bench.peers --data ")
    transkun, basic_pitch = report["systems"]
    for s in (transkun, basic_pitch):
        assert s["status"] == "skipped" and s["clips"] == [] and s["mean"] is None
        assert "is not installed" in s["reason"]
        assert "pip install -e '.[bench]'" in s["reason"]
    assert "pip install --no-deps basic-pitch==0.4.0" in basic_pitch["reason"]
    assert "skipped" in peers.format_table(report)


def test_a_model_folder_the_runtime_cannot_open_is_skipped(devset, tmp_path):
    missing = tmp_path / "no-model"
    report = peers.run_peers(devset, peers=[peers.PianolmPeer(model_dir=missing)],
                             log=lambda s: None)
    (system,) = report["systems"]
    assert system["status"] == "skipped" and system["mean"] is None
    assert str(missing) in system["reason"]


def test_transkun_notes_are_extended_by_its_own_sustain_pedal():
    events = [SimpleNamespace(start=1.0, end=2.0, pitch=60, velocity=70),
              SimpleNamespace(start=1.5, end=4.0, pitch=-64, velocity=127),  # sustain
              SimpleNamespace(start=0.0, end=4.0, pitch=-67, velocity=127),  # soft pedal
              SimpleNamespace(start=0.2, end=0.4, pitch=21, velocity=30),
              SimpleNamespace(start=2.5, end=2.8, pitch=60, velocity=40)]
    raw = [Note(0.2, 0.4, 21, 30), Note(1.0, 2.0, 60, 70), Note(2.5, 2.8, 60, 40)]
    assert peers.transkun_notes(events, extend_pedal=False) == raw
    # released under the pedal: held until the key is struck again (2.5) or the pedal lifts
    assert peers.transkun_notes(events) == [
        Note(0.2, 0.4, 21, 30), Note(1.0, 2.5, 60, 70), Note(2.5, 4.0, 60, 40)]


def test_basic_pitch_velocity_is_its_amplitude_times_127():
    events = [(1.0, 1.5, 60, 0.25, None), (0.5, 0.7, 72, np.float32(1.0), [0, 1]),
              (2.0, 2.1, 48, 0.0, None)]
    assert peers.basic_pitch_notes(events) == [
        Note(0.5, 0.7, 72, 127), Note(1.0, 1.5, 60, 32), Note(2.0, 2.1, 48, 1)]


@pytest.fixture
def fake_torchaudio(tmp_path, monkeypatch):
    """A `torchaudio` package on sys.path shaped like the real one: its __init__ imports
    `_extension` first, then a module that reads the extension's flag. Returns a function
    that writes the extension, so a test decides whether it loads."""
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "torchaudio"}
    for k in saved:
        del sys.modules[k]
    pkg = tmp_path / "torchaudio"
    (pkg / "_extension").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import _extension\nfrom . import functional\n")
    (pkg / "functional.py").write_text(
        "from torchaudio._extension import _IS_TORCHAUDIO_EXT_AVAILABLE as EXT\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def extension(body: str) -> None:
        (pkg / "_extension" / "__init__.py").write_text(textwrap.dedent(body))

    yield extension
    for k in [k for k in sys.modules if k.split(".")[0] == "torchaudio"]:
        del sys.modules[k]
    sys.modules.update(saved)


def test_torchaudio_without_its_cuda_extension(fake_torchaudio):
    fake_torchaudio("""
        try:
            raise OSError("libc10_cuda.so: cannot open shared object file")
        except OSError as e:
            raise OSError("Could not load this library: _torchaudio.so") from e
        """)
    reason = peers._import_torchaudio()
    assert reason is not None and "libc10_cuda.so" in reason
    assert sys.modules["torchaudio"].functional.EXT is False
    with pytest.raises(RuntimeError, match="native extension"):
        sys.modules["torchaudio._extension"].fail_if_no_align(lambda: None)()


def test_torchaudio_that_imports_is_left_alone(fake_torchaudio):
    fake_torchaudio("_IS_TORCHAUDIO_EXT_AVAILABLE = True\n")
    assert peers._import_torchaudio() is None
    assert sys.modules["torchaudio"].functional.EXT is True
