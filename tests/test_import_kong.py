"""Importing Kong et al.'s Note_pedal checkpoint (export/kong.py).

Without Kong's package: a random checkpoint of his layout round-trips, and every malformed
file is refused with a one-line KongImportError naming the file (pickled objects without
being executed). With it (the peers extra): his model and ours, loaded from the same file,
give the same seven rolls within 1e-4, and skipping the BatchNorm eps fold would not.

The random checkpoint is ~172 MB (Kong's size); files written here are removed after use.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from pianolm.export.kong import (  # noqa: E402
    KongCRNN,
    KongImportError,
    load_kong_checkpoint,
    random_kong_state,
    save_kong_checkpoint,
)

SR = 16000
# Kong's output_dict names for our roll keys.
KONG_OUTPUTS = {
    "onset": "reg_onset_output",
    "offset": "reg_offset_output",
    "frame": "frame_output",
    "velocity": "velocity_output",
    "pedal_onset": "reg_pedal_onset_output",
    "pedal_offset": "reg_pedal_offset_output",
    "pedal_frame": "pedal_frame_output",
}
MEL = "logmel_extractor.melW"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def state() -> dict[str, dict[str, torch.Tensor]]:
    return random_kong_state(seed=0)


@pytest.fixture
def ckpt(tmp_path: Path) -> Iterator[Path]:
    """Where a test writes its checkpoint; deleted afterwards (each is up to 172 MB)."""
    path = tmp_path / "CRNN_note_pedal.pth"
    yield path
    path.unlink(missing_ok=True)


def tones(seconds: float, freqs: tuple[float, ...], seed: int) -> torch.Tensor:
    """A few sine tones plus a little noise, float32 [samples]."""
    t = torch.arange(int(seconds * SR), dtype=torch.float64) / SR
    x = sum(0.1 * torch.sin(2 * math.pi * f * t) for f in freqs)
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed), dtype=t.dtype)
    return (x + 0.01 * noise).float()


def fails(path: Path) -> str:
    """The one-line message load_kong_checkpoint raises for `path`."""
    with pytest.raises(KongImportError) as info:
        load_kong_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    return message


# --------------------------------------------------------------------------------------
# Without Kong's package
# --------------------------------------------------------------------------------------


def test_round_trip(state, ckpt: Path) -> None:
    save_kong_checkpoint(state, ckpt)
    model, info = load_kong_checkpoint(ckpt)
    assert isinstance(model, KongCRNN) and not model.training
    # bn0 and 4 x 8 conv-block BatchNorms in the note model, bn0 and 3 x 8 in the pedal model.
    assert len(info["eps_folded"]) == 33 + 25
    assert info["eps_fold"] == pytest.approx(0.01 - 1e-5)
    assert info["parameters"] == info["note_parameters"] + info["pedal_parameters"]
    assert info["other_keys"] == []

    loaded = model.state_dict()
    folded = {f"{name}.running_var" for name in info["eps_folded"]}
    for prefix, part in (("note", "note_model"), ("pedal", "pedal_model")):
        for key, value in state[part].items():
            ours = f"{prefix}.{key}"
            if key.startswith(("spectrogram_extractor.", "logmel_extractor.")):
                assert ours not in loaded  # rebuilt, not loaded
            elif ours in folded:
                torch.testing.assert_close(loaded[ours], value + info["eps_fold"])
            else:
                assert torch.equal(loaded[ours], value), ours
    assert "pedal.reg_pedal_frame_model.bn5.running_var" not in folded  # BatchNorm1d: 1e-5


def test_legacy_format_and_other_top_level_keys(state, ckpt: Path) -> None:
    # Pre-1.6 torch wrote the non-zip format, as a 2020 checkpoint may be.
    torch.save({"model": state, "iteration": 300000}, ckpt, _use_new_zipfile_serialization=False)
    _, info = load_kong_checkpoint(ckpt)
    assert info["other_keys"] == ["iteration"]


def test_flat_note_pedal_state_dict(state, ckpt: Path) -> None:
    """The LLM decoder's authors save their fine-tuned encoder as Note_pedal.state_dict():
    one flat dict, 'note_model.' and 'pedal_model.' prefixes. It loads as the Zenodo file."""
    torch.save({f"{part}.{k}": v for part, sd in state.items() for k, v in sd.items()}, ckpt)
    flat, _ = load_kong_checkpoint(ckpt)
    save_kong_checkpoint(state, ckpt)
    zenodo, _ = load_kong_checkpoint(ckpt)
    for (name, a), b in zip(flat.state_dict().items(), zenodo.state_dict().values()):
        assert torch.equal(a, b), name
    torch.save({f"note_model.{k}": v for k, v in state["note_model"].items()}, ckpt)
    assert "pedal_model" in fails(ckpt)


def test_note_part_is_crnn_and_interface(state) -> None:
    model = KongCRNN().eval()
    wave = torch.stack([tones(1.0, (261.6, 523.3), seed=1), tones(1.0, (98.0,), seed=2)])
    with torch.inference_mode():
        out = model(wave)
        note = model.note(wave)
        alone = model(wave[1:])
    assert tuple(out.rolls) == KongCRNN.roll_keys
    for key in ("onset", "offset", "frame", "velocity"):
        assert torch.equal(out.rolls[key], note.rolls[key]), key  # bit-identical to CRNN
    assert torch.equal(out.embedding, note.embedding)
    frames = model.num_frames(wave.shape[1])
    assert frames == 101 and out.embedding.shape == (2, frames, model.embed_dim)
    for key in ("pedal_onset", "pedal_offset", "pedal_frame"):
        roll = out.rolls[key]
        assert roll.shape == (2, frames, 1)
        assert roll.min() > 0 and roll.max() < 1
        torch.testing.assert_close(alone.rolls[key], roll[1:], rtol=0, atol=1e-5)
    assert model.embed_dim == 1536 and model.frames_per_second == 100
    assert model.frames_per_segment == 1001 and model.input_peak is None
    with torch.inference_mode():
        assert torch.equal(model.embed(wave), out.embedding)


def _without(part: dict, key: str) -> dict:
    return {k: v for k, v in part.items() if k != key}


def test_missing_key(state, ckpt: Path) -> None:
    key = "reg_pedal_onset_model.fc.weight"
    save_kong_checkpoint({**state, "pedal_model": _without(state["pedal_model"], key)}, ckpt)
    message = fails(ckpt)
    assert "pedal_model" in message and "1 missing" in message and key in message


def test_unexpected_keys(state, ckpt: Path) -> None:
    extra = {f"extra_head.layer{i}.weight": torch.zeros(2) for i in range(6)}
    save_kong_checkpoint({**state, "note_model": {**state["note_model"], **extra}}, ckpt)
    message = fails(ckpt)
    assert "note_model" in message and "6 unexpected" in message and "+2 more" in message


def test_wrong_shape(state, ckpt: Path) -> None:
    key = "frame_fc.weight"
    note = {**state["note_model"], key: torch.zeros(88, 256)}
    save_kong_checkpoint({**state, "note_model": note}, ckpt)
    message = fails(ckpt)
    assert f"{key} [88, 256] (want [88, 512])" in message


def test_note_only(state, ckpt: Path) -> None:
    torch.save({"iteration": 1, "model": state["note_model"]}, ckpt)
    assert "note-only" in fails(ckpt)
    torch.save(state["note_model"], ckpt)
    assert "note-only" in fails(ckpt)
    torch.save({"model": {"note_model": state["note_model"]}}, ckpt)
    assert "pedal_model" in fails(ckpt)


def test_frontend_mismatch(state, ckpt: Path) -> None:
    pedal = {**state["pedal_model"], MEL: state["pedal_model"][MEL] * 1.01}
    save_kong_checkpoint({**state, "pedal_model": pedal}, ckpt)
    message = fails(ckpt)
    assert f"pedal_model.{MEL} differs" in message


def _touch(path: str) -> None:
    Path(path).write_text("executed")


class Payload:
    """Unpickling this would call _touch(marker): the loader must never get that far."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


def test_pickled_objects_are_refused_unexecuted(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    for name, obj in {"object.pth": Payload(marker), "function.pth": _touch}.items():
        torch.save({"model": obj}, tmp_path / name)
        message = fails(tmp_path / name)
        assert "pickled Python objects" in message and "refused" in message
        assert "_touch" in message  # names the global it would have called
    # A plain pickle (not torch.save): refused at its first unsupported opcode.
    with open(tmp_path / "plain_pickle.pth", "wb") as f:
        pickle.dump(Payload(marker), f, protocol=4)
    message = fails(tmp_path / "plain_pickle.pth")
    assert "not a PyTorch checkpoint (Unsupported operand" in message and "refused" in message
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path: Path) -> None:
    assert "no such file" in fails(tmp_path / "absent.pth")
    text = tmp_path / "notes.txt"
    text.write_text("C4 E4 G4\n")
    assert "not a PyTorch checkpoint (Unsupported operand" in fails(text)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert "not a PyTorch checkpoint" in fails(empty)
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    assert "expected {'model'" in fails(tmp_path / "list.pth")


# --------------------------------------------------------------------------------------
# Against Kong's own code
# --------------------------------------------------------------------------------------


def test_matches_kong_note_pedal(state, ckpt: Path) -> None:
    pytest.importorskip("torchlibrosa", reason="needs the peers extra: pip install -e '.[peers]'")
    models = pytest.importorskip(
        "piano_transcription_inference.models",
        reason="needs the peers extra: pip install -e '.[peers]'",
    )
    kong = models.Note_pedal(frames_per_second=100, classes_num=88)
    # Store Kong's own torchlibrosa front-end (librosa-built) so that our loader's check of
    # it against pianolm's kernels is exercised on the real tensors.
    fresh = kong.state_dict()
    state = {
        part: {k: fresh[f"{part}.{k}"].clone() if "_extractor." in k else v
               for k, v in sd.items()}
        for part, sd in state.items()
    }
    kong.load_state_dict(state, strict=True)  # Note_pedal's: same keys, no more, no fewer
    kong.eval()
    save_kong_checkpoint(state, ckpt)
    model, info = load_kong_checkpoint(ckpt)

    wave = torch.stack([
        tones(10.0, (220.0, 440.0, 660.5, 1000.0), seed=1),
        tones(10.0, (55.0, 329.6, 1760.0), seed=2),
    ])
    with torch.inference_mode():
        theirs = kong(wave)
        ours = model(wave)
        ours_single = model(wave[:1])
    for key, name in KONG_OUTPUTS.items():
        assert ours.rolls[key].shape == theirs[name].shape, key
        torch.testing.assert_close(ours.rolls[key], theirs[name], rtol=0, atol=1e-4)
        torch.testing.assert_close(ours_single.rolls[key], theirs[name][:1], rtol=0, atol=1e-4)

    # Without the eps fold (Kong's BatchNorm2d eps 0.01 read as 1e-5) the rolls move far
    # beyond the tolerance: the parity above depends on it.
    for name in info["eps_folded"]:
        model.get_submodule(name).running_var -= info["eps_fold"]
    with torch.inference_mode():
        unfolded = model(wave[:1])
    for key, name in KONG_OUTPUTS.items():
        gap = (unfolded.rolls[key] - theirs[name][:1]).abs().max().item()
        assert gap > 50 * 1e-4, (key, gap)
    notes = max((unfolded.rolls[k] - theirs[KONG_OUTPUTS[k]][:1]).abs().max().item()
                for k in ("onset", "offset", "frame", "velocity"))
    assert notes > 0.1
