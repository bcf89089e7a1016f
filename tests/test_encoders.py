"""Encoders (CRNN, HPPNet): shapes, ranges, sizes, determinism, ONNX export and ORT parity.

Kept light for a shared 2-core machine: one full-length (10 s) batch-1 forward per encoder,
batch and determinism checks on 2 s clips; the ONNX graph (dynamic batch and sample axes) is
checked against PyTorch on the 2 s batch of 2 and on the 10 s segment.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from pianolm.export.encoders import (  # noqa: E402
    ENCODER_OUTPUT_NAMES,
    ENCODERS,
    ROLL_KEYS,
    EncoderGraph,
    EncoderOutput,
    build_encoder,
)

SEGMENT = 160000
CLIP = 32000  # 2 s: long enough for the CQT's reflect padding
EXPECTED = {
    # name: (embed_dim, frames/s, frames per 10 s, parameter range)
    "crnn": (1536, 100, 1001, (19.5e6, 21e6)),
    "hppnet": (352, 50, 501, (1.1e6, 1.4e6)),
    # HPPNet-sp at half width with the level-aware velocity head (the shipped encoder)
    "hppnet-cpu-vl": (352, 50, 501, (0.37e6, 0.39e6)),
}
# Frames at each end of a waveform within the time receptive field of the front-end's reflect
# padding (HPPNet: three 7x7 convs and three 5x1 time convs reach +-15 frames). There the
# log-CQT turns rounding into errors that decay over ~12 frames: up to 8.8e-4 at frame 8 on an
# Intel Xeon (AVX-512), 1.5e-4 from frame 16 on; the interior's ~5e-5.
EDGE_FRAMES = 16
FORBIDDEN_OPS = {"DFT", "STFT", "If", "Loop", "Scan"}  # no TensorRT DFT; no control flow


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny recurrent-step ops under OpenMP with two threads on a shared 2-core machine can
    # run ~25x slower than with one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _waveform(batch: int, samples: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(batch, samples, generator=g)


def _max_rel(got: np.ndarray, want: np.ndarray) -> float:
    """Largest deviation relative to the output's scale."""
    return float(np.abs(got - want).max() / np.abs(want).max())


class _Run:
    """One encoder and the forwards several tests share."""

    def __init__(self, name: str) -> None:
        torch.manual_seed(0)
        self.name = name
        self.model = build_encoder(name).eval()
        self.clip = _waveform(2, CLIP, seed=1)
        self.segment = _waveform(1, SEGMENT, seed=2)
        with torch.inference_mode():
            self.out2 = self.model(self.clip)  # batch 2
            self.out1 = self.model(self.clip[1:])  # batch 1, second example
            self.full = self.model(self.segment)  # one 10 s segment
        # PyTorch against itself when only the batch composition changes: the float32
        # noise floor of this model on this input.
        self.self_gap = _max_rel(self.out2.embedding[1:].numpy(), self.out1.embedding.numpy())


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def run(request) -> _Run:
    return _Run(request.param)


def test_registry():
    assert set(ENCODERS) == {"crnn", "hppnet", "hppnet-cpu", "hppnet-cpu-vl"}
    from pianolm.runtime.cli import build_parser

    # `pianolm info --encoder` spells the names out (the CLI module stays torch-free)
    commands = build_parser()._subparsers._group_actions[0].choices
    (option,) = [a for a in commands["info"]._actions if a.dest == "encoder"]
    assert set(option.choices) == set(ENCODERS)
    with pytest.raises(ValueError, match="unknown encoder 'nope'.*crnn, hppnet"):
        build_encoder("nope")


def test_attributes_and_parameter_count(run: _Run):
    embed_dim, fps, frames, (lo, hi) = EXPECTED[run.name]
    m = run.model
    assert (m.embed_dim, m.frames_per_second, m.frames_per_segment) == (embed_dim, fps, frames)
    assert m.num_frames(SEGMENT) == frames
    n_params = sum(p.numel() for p in m.parameters())
    assert lo < n_params < hi, f"{run.name}: {n_params} parameters"


def test_full_segment_forward(run: _Run):
    embed_dim, _, frames, _ = EXPECTED[run.name]
    out = run.full
    assert isinstance(out, EncoderOutput)
    assert list(out.rolls) == list(ROLL_KEYS)
    for roll in out.rolls.values():
        assert roll.shape == (1, frames, 88)
        assert roll.min() > 0 and roll.max() < 1
    assert out.embedding.shape == (1, frames, embed_dim)
    assert torch.isfinite(out.embedding).all()


def test_batch_shapes_determinism_and_independence(run: _Run):
    embed_dim, _, _, _ = EXPECTED[run.name]
    frames = run.model.num_frames(CLIP)
    assert run.out2.embedding.shape == (2, frames, embed_dim)
    assert run.out1.embedding.shape == (1, frames, embed_dim)
    for key in ROLL_KEYS:
        assert run.out2.rolls[key].shape == (2, frames, 88)
        assert 0 < run.out2.rolls[key].min() and run.out2.rolls[key].max() < 1
    with torch.inference_mode():
        again = run.model.embed(run.clip[1:])
    assert torch.equal(again, run.out1.embedding)  # eval mode: bit-for-bit repeatable
    # An example's output does not depend on what else is in the batch (a coupling such as
    # a batch-wide dB reference would show as O(0.1); float32 noise stays ~1e-3 at worst).
    assert run.self_gap < 5e-3


def test_onnx_export_and_ort_parity(run: _Run, tmp_path, monkeypatch):
    path = tmp_path / f"{run.name}.onnx"
    out2, full = run.out2, run.full
    if run.name.startswith("hppnet"):
        # The export traces the authors' form of the harmonic conv (`forward_separate`); the
        # eager fast path regroups the same sums (checked on its own below). Compare the graph
        # with the formulation it holds, so the float32 rounding of the two orders of summation
        # (amplified by the log-CQT) does not count as an export error.
        from pianolm.export.hppnet import HarmonicDilatedConv

        monkeypatch.setattr(HarmonicDilatedConv, "forward", HarmonicDilatedConv.forward_separate)
        with torch.inference_mode():
            out2, full = run.model(run.clip), run.model(run.segment)
    batch = torch.export.Dim("batch", min=1, max=64)
    samples = torch.export.Dim("samples", min=24000, max=16000 * 600)
    program = torch.onnx.export(
        EncoderGraph(run.model).eval(),
        (run.clip,),
        dynamo=True,
        opset_version=18,
        input_names=["waveform"],
        output_names=list(ENCODER_OUTPUT_NAMES),
        dynamic_shapes=({0: batch, 1: samples},),
        optimize=False,  # halves the export time here; ONNX Runtime optimises at load
    )
    program.save(str(path))

    model = onnx.load(str(path))
    ops = {node.op_type for node in model.graph.node}
    assert not ops & FORBIDDEN_OPS, ops & FORBIDDEN_OPS
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    assert "GRU" in ops or "LSTM" in ops  # native recurrent ops, not unrolled
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 18
    (wave,) = model.graph.input
    assert all(d.dim_param for d in wave.type.tensor_type.shape.dim)  # both axes dynamic
    assert [o.name for o in model.graph.output] == list(ENCODER_OUTPUT_NAMES)

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    # 1e-4 of each output's scale, or what PyTorch itself shows across batch compositions if
    # that is larger: HPPNet's 10 * log10|CQT| turns float32 rounding at the odd bin where
    # |CQT| nears zero (e.g. frame 0, real-valued under reflect padding) into ~1e-3 errors.
    tol = max(1e-4, 4 * run.self_gap)

    def check(waveform: torch.Tensor, reference: EncoderOutput) -> None:
        got = session.run(None, {"waveform": waveform.numpy()})
        want = [reference.embedding, *(reference.rolls[k] for k in ROLL_KEYS)]
        for name, g, w in zip(ENCODER_OUTPUT_NAMES, got, want, strict=True):
            assert g.shape == w.shape, name
            w = w.numpy()
            # The first and last frames see reflect padding, under which the lowest CQT bins
            # nearly cancel (frame 0 is real-valued): there the log-CQT turns rounding into
            # ~2e-3 (measured: HPPNet frames 1-6 on an AMD EPYC, up to frame 11 on an Intel
            # Xeon; identical with ORT's optimisations off). The interior is held to `tol`,
            # the edges (EDGE_FRAMES) to 1e-2.
            inner = (slice(None), slice(EDGE_FRAMES, -EDGE_FRAMES))
            rel = float(np.abs(g[inner] - w[inner]).max() / np.abs(w).max())
            assert rel <= tol, f"{run.name}/{name}: max rel error {rel:.2e} > {tol:.1e}"
            rel_edges = _max_rel(g, w)
            assert rel_edges <= 1e-2, f"{run.name}/{name}: edge frames {rel_edges:.2e} > 1e-2"

    check(run.clip, out2)  # 2 s, batch 2
    check(run.segment, full)  # 10 s, batch 1


def test_hppnet_fast_paths_compute_the_reference_layers(monkeypatch):
    """HPPNet's CPU fast paths compute the authors' layers.

    The harmonic dilated conv runs as one matmul over regrouped taps instead of the sum of 8
    dilated convs (`forward_separate`, also what the ONNX export uses), and block 4 max-pools
    before its ReLU via a reshape. Values and gradients match the reference formulation in
    float64, and the float32 model matches its reference-path twin to float32 rounding.
    """
    import torch.nn.functional as F

    from pianolm.export.hppnet import FreqMaxPool, HarmonicDilatedConv, HPPNet

    torch.manual_seed(0)
    layer = HarmonicDilatedConv(3, 5, bins_per_octave=48, harmonics=8).double()
    x = torch.randn(2, 3, 4, 352, dtype=torch.float64, requires_grad=True)
    fast, ref = layer(x), layer.forward_separate(x)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    grads_fast = torch.autograd.grad(fast, (x, *layer.parameters()), g)
    grads_ref = torch.autograd.grad(ref, (x, *layer.parameters()), g)
    for a, b in zip(grads_fast, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    # max-pool then ReLU == ReLU then max-pool, bit for bit, with and without autograd.
    y = torch.randn(2, 3, 4, 352, requires_grad=True)
    want = F.max_pool2d(F.relu(y), (1, 4))
    got = F.relu(FreqMaxPool(4)(y))
    assert torch.equal(got, want)
    g = torch.randn_like(want)
    assert torch.equal(torch.autograd.grad(got, y, g)[0], torch.autograd.grad(want, y, g)[0])
    with torch.no_grad():
        assert torch.equal(F.relu(FreqMaxPool(4)(y)), want)

    # Whole model, eval and train mode: fast paths against the reference formulation.
    model = build_encoder("hppnet")
    wave = _waveform(1, CLIP, seed=3)
    outputs = {}
    for mode in ("fast", "reference"):
        if mode == "reference":
            reference = HarmonicDilatedConv.forward_separate
            monkeypatch.setattr(HarmonicDilatedConv, "forward", reference)
        with torch.inference_mode():
            outputs[mode, "eval"] = model.eval().embed(wave)
        outputs[mode, "train"] = model.train().embed(wave).detach()
    assert isinstance(model, HPPNet)
    for mode in ("eval", "train"):
        rel = _max_rel(outputs["fast", mode].numpy(), outputs["reference", mode].numpy())
        assert rel <= 1e-5, f"{mode}: max rel deviation {rel:.1e}"
