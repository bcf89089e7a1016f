"""Time-aligned cross-attention (docs/decoder.md): the query-tick rule, the look-ahead prior,
the pointer time head, and their export: every option's teacher-forced pass equals its cached
step decode, the exported graphs match PyTorch, decoding through ONNX Runtime (plain and with
IO binding) is token-identical to the PyTorch reference, the manifest describes the new
inputs and outputs, and the TensorRT static check accepts the graphs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pianolm.runtime import vocab as V
from pianolm.runtime.backend import RowPositions

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")

from pianolm.export.decoder import (  # noqa: E402
    LOOK_AHEAD_MARGIN,
    MASKED,
    Decoder,
    DecoderConfig,
    LookAhead,
    sharpen,
)
from pianolm.export.onnx_export import export_model  # noqa: E402
from pianolm.export.parity import graph_parity  # noqa: E402
from pianolm.export.system import SystemConfig, TranscriptionSystem  # noqa: E402
from pianolm.export.tensorrt import check_model  # noqa: E402
from pianolm.export.torch_backend import CachedSession, TorchBackend  # noqa: E402
from pianolm.runtime.decode import RowSpec, decode_batch  # noqa: E402
from pianolm.runtime.graphs import POINTER_KEY  # noqa: E402
from pianolm.runtime.manifest import (  # noqa: E402
    FORMAT_VERSION,
    MANIFEST_FILE,
    ManifestError,
    load_manifest,
)
from pianolm.runtime.ort_backend import OrtBackend  # noqa: E402
from pianolm.runtime.ort_iobinding import OrtIoBindingBackend  # noqa: E402
from tests.test_export_manifest import older_copy  # noqa: E402
from tests.tiny_model import TinyEncoder  # noqa: E402

OPTIONS = {  # DecoderConfig alignment fields per arm
    "token": {},
    "time": {"cross_positions": "time"},
    "look_ahead": {"cross_positions": "time", "look_ahead": True},
    "pointer": {"cross_positions": "time", "time_head": "pointer"},
    "both": {"cross_positions": "time", "look_ahead": True, "time_head": "pointer"},
}


def t(tick: int) -> int:
    return V.time_token(tick)


def p(pitch: int) -> int:
    return V.pitch_token(pitch)


# ---------------------------------------------------------------------------------------------
# The query-tick rule (runtime side, torch-free)


def test_query_ticks_follow_the_latest_time_token():
    onset = [V.SOS, V.TASK_ONSET, t(10), p(60), p(64), t(37), p(50)]
    assert V.query_ticks(np.array([onset])).tolist() == [[0, 0, 10, 10, 10, 37, 37]]
    # offset stage: a carried note's `on` is note_sustain -> tick 0; `off` moves the tick
    offset = [V.SOS, V.TASK_OFFSET, V.NOTE_SUSTAIN, p(60), t(40), t(12), p(62), t(90)]
    assert V.query_ticks(np.array([offset])).tolist() == [[0, 0, 0, 0, 40, 12, 12, 90]]
    # a chunk continues from the row's tick before it; padding moves nothing
    chunk = np.array([[p(60), t(50), p(61)], [t(70), t(80), p(62)]])
    mask = np.array([[True, True, True], [True, False, True]])
    got = V.query_ticks(chunk, mask, start=np.array([33, 5]))
    assert got.tolist() == [[33, 50, 50], [70, 70, 70]]


def test_row_positions_track_ticks_across_chunks_and_keep():
    rows = RowPositions.empty(3)
    first = rows.advance_ticks(np.array([[t(5)], [p(60)], [t(9)]]), np.ones((3, 1), bool))
    assert first[:, 0].tolist() == [5, 0, 9]
    rows.select(np.array([2, 0]))
    nxt = rows.advance_ticks(np.array([[p(60)], [t(7)]]), np.array([[True], [False]]))
    assert nxt[:, 0].tolist() == [9, 5]  # row 0's time token was padding: its tick stays


# ---------------------------------------------------------------------------------------------
# The decoder options in PyTorch


def _decoder(arm: str, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(n_layers=2, d_model=64, n_heads=4, enc_dim=24, ticks_per_frame=2,
                        **OPTIONS[arm])
    return sharpen(Decoder(cfg), seed=seed + 1).eval()


def _sequence(batch: int, length: int, seed: int) -> np.ndarray:
    """Onset-stage-like rows: increasing time tokens, pitches, and a few of anything else."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        ticks = np.sort(rng.integers(0, 1000, length))
        row = [V.SOS, V.TASK_ONSET]
        for i in range(length - 2):
            row.append(t(int(ticks[i])) if i % 2 == 0 else p(int(rng.integers(21, 109))))
        rows.append(row)
    return np.array(rows, dtype=np.int64)


@pytest.mark.parametrize("arm", list(OPTIONS))
def test_cached_steps_equal_the_teacher_forced_pass(arm):
    """Chunks of 1-3 tokens through CachedSession (the runtime's tick rule, one row padded for
    a while) give the logits of the full forward at the same positions."""
    dec = _decoder(arm)
    emb = torch.randn(2, 501, 24)
    seq = _sequence(2, 20, seed=1)
    ticks = torch.from_numpy(V.query_ticks(seq)) if dec.cfg.time_aligned else None
    with torch.inference_mode():
        full = dec(torch.from_numpy(seq), emb, query_ticks=ticks).numpy()
    session = CachedSession(dec, emb)
    # row 1 waits (padding) for its first 2 chunks, then catches up token by token
    i = [0, 0]
    worst = 0.0
    for step in range(30):
        n = 1 + step % 3
        chunk = np.zeros((2, n), np.int64)
        mask = np.zeros((2, n), bool)
        for r in range(2):
            if r == 1 and step < 2:
                continue
            take = seq[r, i[r]:i[r] + n]
            chunk[r, :len(take)], mask[r, :len(take)] = take, True
        if not mask[:, -1].any():
            break
        logits = session.step(chunk, mask)
        for r in range(2):
            got = int(mask[r].sum())
            i[r] += got
            if mask[r, -1]:
                ref = full[r, i[r] - 1]
                worst = max(worst, float(np.abs(logits[r] - ref).max() / np.abs(ref).max()))
    assert i[0] >= 10 and i[1] >= 10
    assert worst < 1e-5, worst


def test_look_ahead_masks_the_past_and_never_a_whole_row():
    ticks = torch.tensor([[0, 40, 999, 5000]])
    la = LookAhead(ticks, frames=11, ticks_per_frame=100)  # frame ticks 0, 100, ..., 1000
    bias = la.bias(torch.tensor([0.0, 10.0]))  # [1, 2, 4, 11]
    assert bias.shape == (1, 2, 4, 11)
    assert not (bias == MASKED).all(-1).any()  # the last frame stays even past the end
    # query at tick 40: frame 0 (tick 0 < 40 - margin) masked, later frames decay in head 1
    assert bias[0, 0, 1, 0] == MASKED and bias[0, 0, 1, 1] == 0.0
    assert bias[0, 1, 1, 2] == pytest.approx(-10.0 * (200 - 40) / 100)
    assert LOOK_AHEAD_MARGIN == 2 and bias[0, 0, 0, 0] == 0.0


def test_pointer_time_logits_read_the_frames():
    """The time slots come from the frames: ticks 2f and 2f+1 share frame f's score (plus the
    sub-frame offset), ticks past the last frame are masked, the other tokens keep the head."""
    dec = _decoder("pointer")
    emb = torch.randn(1, 51, 24)  # 51 frames of 2 ticks: ticks above 101 have no frame
    seq = torch.tensor([[V.SOS, V.TASK_ONSET, t(30)]])
    ticks = torch.from_numpy(V.query_ticks(seq.numpy()))
    with torch.inference_mode():
        logits = dec(seq, emb, query_ticks=ticks)[0, -1]
    times = logits[V.TIME_BASE:V.PITCH_BASE]
    assert (times[102:] == MASKED).all() and (times[:102] > MASKED).all()
    sub = times[1:102:2] - times[0:102:2]
    assert torch.allclose(sub, sub[0].expand_as(sub), atol=1e-4)  # one offset for every frame
    other = torch.cat([logits[:V.TIME_BASE], logits[V.PITCH_BASE:]])
    assert other.abs().max() > 0


def test_time_aligned_decoder_requires_query_ticks():
    dec = _decoder("time")
    with pytest.raises(ValueError, match="query_ticks"):
        dec(torch.tensor([[V.SOS]]), torch.randn(1, 5, 24))
    with pytest.raises(ValueError, match="cross_positions='time'"):
        DecoderConfig(n_layers=1, d_model=64, n_heads=4, enc_dim=24, look_ahead=True)
    with pytest.raises(ValueError, match="time_head"):
        DecoderConfig(n_layers=1, d_model=64, n_heads=4, enc_dim=24, time_head="x")


def test_config_round_trips_through_json():
    cfg = DecoderConfig(n_layers=1, d_model=64, n_heads=4, enc_dim=24, **OPTIONS["both"])
    assert DecoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="look_ahead"):
        DecoderConfig.from_dict({**cfg.to_dict(), "look_ahead": 1})


# ---------------------------------------------------------------------------------------------
# Export and the runtime


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """A tiny hierarchical system whose stages use different options: onset both priors,
    velocity time RoPE alone, offset look-ahead; exported once."""
    torch.manual_seed(3)
    enc = TinyEncoder()
    base = {"n_layers": 2, "d_model": 64, "n_heads": 4, "enc_dim": 24, "ticks_per_frame": 20}
    cfgs = {"onset": DecoderConfig(**base, **OPTIONS["both"]),
            "velocity": DecoderConfig(**base, **OPTIONS["time"]),
            "offset": DecoderConfig(**base, **OPTIONS["look_ahead"])}
    system = TranscriptionSystem(SystemConfig(encoder="tiny-test", decoder=cfgs), encoder=enc)
    for i, dec in enumerate(system.decoders.values()):
        sharpen(dec, seed=20 + i)
    folder = tmp_path_factory.mktemp("aligned") / "model"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        export_model(system.eval(), folder, seed=3)
    finally:
        torch.set_num_threads(threads)
    return system, folder


def test_manifest_describes_the_new_io(aligned):
    _, folder = aligned
    m = load_manifest(folder)
    assert m.format_version == FORMAT_VERSION
    onset, velocity = m.stage("onset"), m.stage("velocity")
    assert onset.decoder.time_aligned and onset.decoder.look_ahead and onset.decoder.pointer
    assert [t.name for t in onset.step.inputs][:4] == ["tokens", "positions", "key_mask",
                                                        "query_ticks"]
    assert onset.step.input("query_ticks").dtype == "int64"
    assert onset.cross_kv.outputs[-1].name == POINTER_KEY
    assert onset.cross_kv.output(POINTER_KEY).shape == ("batch", 1, 16, "frames")
    assert POINTER_KEY not in velocity.decoder.cross_names


def test_graph_parity(aligned):
    system, folder = aligned
    for batch, past, chunk in ((1, 7, 3), (3, 0, 2), (2, 5, 1)):
        for r in graph_parity(system, folder, batch, seed=batch, past=past, chunk=chunk):
            assert r.max_rel <= 1e-4, r


@pytest.mark.parametrize("backend_kind", ["ort", "iobinding"])
def test_decode_is_token_identical(aligned, backend_kind):
    system, folder = aligned
    rows = [RowSpec(0), RowSpec(1, 0), RowSpec(2, 1), RowSpec(5)]
    audio = (0.1 * np.random.default_rng(4).normal(size=(4, 160000))).astype(np.float32)
    ref = decode_batch(TorchBackend(system), audio, rows, max_notes=6)
    backend = (OrtBackend(folder, threads=1) if backend_kind == "ort"
               else OrtIoBindingBackend(folder, device="cpu", threads=1))
    got = decode_batch(backend, audio, rows, max_notes=6)
    assert [s.tokens for s in got] == [s.tokens for s in ref]
    assert [s.carry_out for s in got] == [s.carry_out for s in ref]
    assert any(len(s.tokens["onset"]) >= 3 for s in got)
    assert any(len(s.tokens["velocity"]) >= 2 for s in got)


def test_uncached_decode_matches_cached(aligned):
    """The authors'-style decode (no cache, full prefix each step) gives the same tokens."""
    system, _ = aligned
    rows = [RowSpec(0), RowSpec(1, 0)]
    audio = (0.1 * np.random.default_rng(6).normal(size=(2, 160000))).astype(np.float32)
    a = decode_batch(TorchBackend(system, use_cache=True), audio, rows, max_notes=5)
    b = decode_batch(TorchBackend(system, use_cache=False), audio, rows, max_notes=5)
    assert [s.tokens for s in a] == [s.tokens for s in b]


def test_tensorrt_static_check_accepts_the_graphs(aligned):
    _, folder = aligned
    assert check_model(folder) == []


def test_manifest_refuses_inconsistent_options(aligned, tmp_path):
    _, src = aligned
    for edit, message in (
            (lambda d: d.update(look_ahead=True, cross_positions="token"), "must be 'time'"),
            (lambda d: d.update(time_head="attention"), "time_head"),
            (lambda d: d.update(ticks_per_frame=2), "ticks_per_frame")):
        folder = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        shutil.copytree(src, folder)
        raw = json.loads((folder / MANIFEST_FILE).read_text())
        edit(raw["stages"][0]["decoder"])
        (folder / MANIFEST_FILE).write_text(json.dumps(raw))
        with pytest.raises(ManifestError, match=message):
            load_manifest(folder)


def test_a_format_4_folder_is_the_authors_layout(exported, tmp_path):
    """Folders written before the options existed load as cross_positions 'token'."""
    def no_options(raw: dict) -> None:
        for stage in raw["stages"]:
            for key in ("cross_positions", "look_ahead", "time_head", "ticks_per_frame"):
                stage["decoder"].pop(key)

    m = load_manifest(older_copy(exported.dirs["hier"], tmp_path / "old", 4, no_options))
    assert all(not s.decoder.time_aligned and not s.decoder.pointer for s in m.stages)
