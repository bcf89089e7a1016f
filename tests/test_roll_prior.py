"""The roll prior (export/roll_prior.py, DecoderConfig.roll_prior): untrained stages whose
logits start from the rolls decode the rolls' notes; the prior's terms are the same in the
full-prefix pass, the cached step and the exported graphs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from pianolm.export.decoder import Decoder, DecoderConfig  # noqa: E402
from pianolm.export.frontend import EncoderOutput  # noqa: E402
from pianolm.export.system import SystemConfig, TranscriptionSystem  # noqa: E402
from pianolm.export.torch_backend import TorchBackend  # noqa: E402
from pianolm.runtime import vocab as V  # noqa: E402
from pianolm.runtime.decode import RowSpec, decode_batch  # noqa: E402
from pianolm.runtime.tokens import decode  # noqa: E402

FRAMES, FPS = 501, 50
KEYS = V.NUM_PITCHES

# (onset frame, end frame or None: sounding past the segment, key, velocity roll)
PLANTED = [(40, 90, 39, 0.5), (40, 70, 43, 0.8), (40, 120, 46, 0.3), (200, 260, 60, 0.6),
           (350, None, 27, 0.4)]


def planted_rolls() -> torch.Tensor:
    """[1, 501, 352] rolls (onset, offset, frame, velocity) holding PLANTED, with soft peaks."""
    onset, offset = torch.full((FRAMES, KEYS), 0.01), torch.full((FRAMES, KEYS), 0.01)
    frame, velocity = torch.full((FRAMES, KEYS), 0.01), torch.zeros(FRAMES, KEYS)
    for start, end, key, vel in PLANTED:
        onset[start - 1:start + 2, key] = torch.tensor([0.4, 0.95, 0.3])
        stop = FRAMES if end is None else end
        frame[start:stop, key] = 0.95
        if end is not None:
            offset[end - 1:end + 2, key] = torch.tensor([0.3, 0.9, 0.3])
        velocity[start, key] = vel
    return torch.cat([onset, offset, frame, velocity], dim=1)[None]


class Rolls(nn.Module):
    """An encoder stand-in whose embedding is the planted rolls, whatever the audio."""

    embed_dim, frames_per_second, frames_per_segment, input_peak = 4 * KEYS, FPS, FRAMES, None

    def __init__(self, rolls: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("rolls", rolls)

    def forward(self, waveform: torch.Tensor) -> EncoderOutput:
        r = self.rolls.expand(len(waveform), -1, -1)
        return EncoderOutput(rolls=dict(zip(("onset", "offset", "frame", "velocity"),
                                            r.split(KEYS, dim=-1))), embedding=r)

    def embed(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.forward(waveform).embedding


def prior_system(rolls: torch.Tensor, seed: int = 0) -> TranscriptionSystem:
    torch.manual_seed(seed)
    return TranscriptionSystem(SystemConfig(encoder="hppnet", decoder="tiny", decoder_options={
        "cross_positions": "time", "look_ahead": True, "time_head": "pointer",
        "roll_prior": True}), encoder=Rolls(rolls)).eval()


def test_untrained_stages_decode_the_rolls_notes() -> None:
    """At init the prior decides: greedy decoding gives the planted notes (onset at the peak
    frame's first tick, the velocity roll x 127 within 2 (the prior is a Gaussian of sd 5, the
    untrained LM's logits tip it), the end at the first tick of the frame where the frame roll
    falls, note_sustain for the note still sounding)."""
    system = prior_system(planted_rolls())
    (seg,) = decode_batch(TorchBackend(system), np.zeros((1, 160000), np.float32),
                          [RowSpec(0)], concurrent=False)
    onsets = decode("onset", seg.tokens["onset"])
    want = sorted((2 * start, key + V.MIN_PITCH) for start, _, key, _ in PLANTED)
    assert onsets == want
    velocities = [V.token_velocity(t) for t in seg.tokens["velocity"][2::3]]
    by_pitch = {key + V.MIN_PITCH: vel for _, _, key, vel in PLANTED}
    assert all(abs(v - 127 * by_pitch[p]) <= 2 for v, (_, p) in zip(velocities, onsets))
    own, _ = decode("offset", seg.tokens["offset"])
    ends = {key + V.MIN_PITCH: end for _, end, key, _ in PLANTED}
    for _, pitch, off in own:
        if ends[pitch] is None:
            assert off is None  # note_sustain: it sounds past the segment
        else:
            assert off == 2 * ends[pitch]


def test_the_prior_learns_nothing_it_need_not() -> None:
    """Without it the same untrained stages decode noise: the test above is the prior's."""
    system = prior_system(planted_rolls())
    plain = TranscriptionSystem(replace(system.config, decoder_options={
        **system.config.decoder_options, "roll_prior": False}), encoder=system.encoder).eval()
    (seg,) = decode_batch(TorchBackend(plain), np.zeros((1, 160000), np.float32), [RowSpec(0)],
                          max_notes=16, concurrent=False)
    onsets = decode("onset", seg.tokens["onset"])
    assert sorted(p for _, p in onsets) != sorted(k + V.MIN_PITCH for _, _, k, _ in PLANTED)


@pytest.mark.parametrize("stage,time_head", [("onset", "pointer"), ("velocity", "pointer"),
                                             ("velocity", "lm"), ("offset", "pointer")])
def test_cached_steps_equal_the_full_pass(stage: str, time_head: str) -> None:
    """Chunks fed one at a time through step() give forward()'s logits at every position."""
    cfg = DecoderConfig.from_preset("tiny", 4 * KEYS, cross_positions="time", look_ahead=True,
                                    time_head=time_head, ticks_per_frame=2, roll_prior=stage)
    torch.manual_seed(1)
    decoder = Decoder(cfg).eval()
    emb = planted_rolls()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(V.TIME_BASE, V.VOCAB_SIZE, (1, 12), generator=g)
    tokens[0, :2] = torch.tensor([V.SOS, V.TASK_TOKEN[stage]])
    ticks = torch.from_numpy(V.query_ticks(tokens.numpy()))
    with torch.inference_mode():
        full = decoder(tokens, emb, query_ticks=ticks)
        cross, past = decoder.cross_kv(emb), decoder.empty_cache(1)
        steps = []
        for i in range(tokens.shape[1]):
            logits, past = decoder.step(tokens[:, i:i + 1], torch.tensor([[i]]),
                                        torch.ones(1, i + 1, dtype=torch.bool), past, cross,
                                        ticks[:, i:i + 1])
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


def test_exported_graphs_give_the_prior(tmp_path) -> None:
    """The cross-KV graph also gives `cross.rolls`, the step graph takes it: ONNX equals torch
    (export/parity.py); ONNX Runtime, with and without IO binding, and speculative decoding
    drafted by the rolls decode PyTorch's tokens; TensorRT's static check passes."""
    pytest.importorskip("onnxscript")
    from pianolm.export.onnx_export import export_model
    from pianolm.export.parity import graph_parity
    from pianolm.export.tensorrt import check_model
    from pianolm.runtime.decode import speculation_for
    from pianolm.runtime.manifest import load_manifest
    from pianolm.runtime.ort_backend import OrtBackend
    from pianolm.runtime.ort_iobinding import OrtIoBindingBackend

    system = prior_system(planted_rolls())
    export_model(system, tmp_path / "m", example_samples=32000)
    m = load_manifest(tmp_path / "m")
    assert [s.decoder.roll_prior for s in m.stages] == ["onset", "velocity", "offset"]
    assert all("cross.rolls" in s.decoder.cross_names for s in m.stages)
    for p in graph_parity(system, tmp_path / "m", batch=2, samples=32000):
        assert p.max_rel < 1e-3, str(p)
    assert check_model(tmp_path / "m") == []
    audio = np.zeros((1, 160000), np.float32)
    torch_ref = decode_batch(TorchBackend(system), audio, [RowSpec(0)], concurrent=False)
    drafts = speculation_for(m, True, "cpu")  # the rolls read in the prior's rule
    stats: dict = {}
    for backend, speculation in ((OrtBackend(tmp_path / "m"), None),
                                 (OrtIoBindingBackend(tmp_path / "m", device="cpu"), None),
                                 (OrtBackend(tmp_path / "m"), drafts)):
        (ours,) = decode_batch(backend, audio, [RowSpec(0)], concurrent=False,
                               speculation=speculation, stats=stats if speculation else None)
        assert ours.tokens == torch_ref[0].tokens
    # drafts that speak the stages' rule are accepted: few decoder calls per note
    calls = sum(s.calls for s in stats.values())
    assert calls <= 1.5 * len(PLANTED) + 6, stats  # + each stage's prompt and last call


def test_calibrated_to_the_encoders_thresholds() -> None:
    """calibrate() starts the prior from the tuned roll thresholds: a frame roll that falls
    only to 0.3 ends a note at p = 0.5 (the default), not at a tuned frame threshold of 0.2;
    a velocity curve's straight-line fit becomes the velocity map."""
    rolls = planted_rolls()
    frame = rolls[0, :, 2 * KEYS:3 * KEYS]
    frame[frame < 0.5] = 0.3  # the frame roll never falls below 0.3
    offset = rolls[0, :, KEYS:2 * KEYS]
    offset[:] = 0.01  # no offset peaks: only the frame roll can end a note

    def offsets(system: TranscriptionSystem) -> list:
        (seg,) = decode_batch(TorchBackend(system), np.zeros((1, 160000), np.float32),
                              [RowSpec(0)], concurrent=False)
        return [off for _, _, off in decode("offset", seg.tokens["offset"])[0]]

    system = prior_system(rolls)
    assert None not in offsets(system)[:4]  # ended where the frame roll fell to 0.3
    system.decoders["offset"].prior.calibrate(0.45, 0.2, 0.2)
    assert offsets(system) == [None] * len(PLANTED)  # 0.3 > 0.2: still sounding
    velocity = system.decoders["velocity"].prior
    velocity.calibrate(0.45, 0.2, 0.2, (0.5, 40.0))  # MIDI velocity = 0.5 x roll x 127 + 40
    assert velocity.velocity_gain.item() == pytest.approx(63.5)
    assert velocity.velocity_offset.item() == pytest.approx(40.0)
