"""TorchBackend with a KV cache vs the authors' uncached decode: same logits, same tokens; and
the TranscriptionSystem around them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pianolm.export import system as system_mod
from pianolm.export.decoder import sharpen
from pianolm.export.system import SystemConfig, TranscriptionSystem, describe_parameters
from pianolm.export.torch_backend import TorchBackend
from pianolm.runtime import vocab
from pianolm.runtime.decode import RowSpec, decode_batch
from tests.test_decoder import StubEncoder, small_config

TOL = 1e-5


def make_system(hierarchical: bool = True, seed: int = 0) -> TranscriptionSystem:
    torch.manual_seed(seed)
    system = TranscriptionSystem(
        SystemConfig(encoder="stub", decoder=small_config(), hierarchical=hierarchical),
        encoder=StubEncoder())
    for i, dec in enumerate(system.decoders.values()):
        sharpen(dec, seed=seed * 10 + i)  # O(1) attention: bugs cannot hide below TOL
    return system.eval()


@pytest.fixture(scope="module")
def system() -> TranscriptionSystem:
    return make_system()


def _audio(b: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(b, 160000)) * 0.1).astype(np.float32)


def _script(rng: np.random.Generator, batch: int, steps: int):
    """Chunks like the decode loop feeds: a prefill, then 1..3-token chunks, rows waiting or
    finished (all pad) or with pads interleaved."""
    chunks = [(np.tile([[vocab.SOS, vocab.TASK_VELOCITY]], (batch, 1)),
               np.ones((batch, 2), dtype=bool))]
    for _ in range(steps):
        n = int(rng.integers(1, 4))
        tok = rng.integers(8, vocab.VOCAB_SIZE, size=(batch, n))
        mask = rng.random((batch, n)) > 0.3
        tok[~mask] = vocab.PAD
        chunks.append((tok.astype(np.int64), mask))
    return chunks


@pytest.mark.parametrize("batch", [1, 3])
def test_cached_equals_uncached(system, batch):
    rng = np.random.default_rng(batch)
    cached, uncached = TorchBackend(system, use_cache=True), TorchBackend(system, False)
    emb = cached.encode(_audio(batch))
    np.testing.assert_array_equal(emb, uncached.encode(_audio(batch)))
    worst = 0.0
    for stage in system.stages:
        a, b = cached.start(stage, emb), uncached.start(stage, emb)
        for tok, mask in _script(rng, batch, steps=12):
            la, lb = a.step(tok, mask), b.step(tok, mask)
            assert la.dtype == np.float32 and la.shape == (batch, vocab.VOCAB_SIZE)
            real = mask[:, -1]  # a row whose chunk ends in a pad returns unread logits
            worst = max(worst, float(np.abs(la - lb)[real].max(initial=0.0)))
            np.testing.assert_array_equal(la[real].argmax(1), lb[real].argmax(1))
    print(f"batch {batch}: max |cached - uncached| logits = {worst:.2e}")
    assert worst < TOL


def test_row_logits_do_not_depend_on_batch(system):
    """A row decoded alone equals the same row in a batch where other rows wait or pad."""
    rng = np.random.default_rng(5)
    backend = TorchBackend(system)
    emb = backend.encode(_audio(3, seed=3))
    script = _script(rng, 3, steps=8)
    batched = backend.start("onset", emb)
    alone = backend.start("onset", emb[1:2])
    for tok, mask in script:
        lb = batched.step(tok, mask)
        la = alone.step(tok[1:2], mask[1:2])
        if mask[1, -1]:
            np.testing.assert_allclose(lb[1], la[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("hierarchical", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_loop_gives_same_tokens(hierarchical, batch):
    """The reference decode with a KV cache and the authors' decode (no cache) agree token for
    token, through the whole hierarchical loop (carried notes included) or the flat baseline."""
    system = make_system(hierarchical, seed=3)
    audio = _audio(batch, seed=4)
    rows = [RowSpec(k, k - 1 if k else None) for k in range(batch)]
    fast = decode_batch(TorchBackend(system, use_cache=True), audio, rows, max_notes=5)
    slow = decode_batch(TorchBackend(system, use_cache=False), audio, rows, max_notes=5)
    assert [s.tokens for s in fast] == [s.tokens for s in slow]
    assert [s.carry_out for s in fast] == [s.carry_out for s in slow]
    assert any(len(t) > 2 for s in fast for t in s.tokens.values())  # it really decoded


def test_backend_checks_its_inputs(system):
    backend = TorchBackend(system)
    assert backend.stages == ("onset", "velocity", "offset")
    with pytest.raises(ValueError, match="audio must be"):
        backend.encode(np.zeros((1, 1000), dtype=np.float32))
    emb = backend.encode(_audio(2))
    assert emb.shape == (2, 51, 24) and emb.dtype == np.float32
    with pytest.raises(ValueError, match="stage 'flat'"):
        backend.start("flat", emb)
    session = backend.start("onset", emb)
    with pytest.raises(ValueError, match="tokens must be"):
        session.step(np.zeros((3, 1), dtype=np.int64), np.ones((3, 1), dtype=bool))
    with pytest.raises(ValueError, match="mask shape"):
        session.step(np.zeros((2, 2), dtype=np.int64), np.ones((2, 1), dtype=bool))


def test_system_encoder_is_frozen(system):
    assert not any(p.requires_grad for p in system.encoder.parameters())
    assert all(p.requires_grad for p in system.decoders.parameters())
    system.train()
    try:
        assert not system.encoder.training and system.decoders.training
    finally:
        system.eval()
    with torch.no_grad():
        out = system(torch.from_numpy(_audio(1)), {"onset": torch.tensor([[1, 3, 8]])})
    assert out["onset"].shape == (1, 3, vocab.VOCAB_SIZE)


def test_system_config_checks():
    with pytest.raises(ValueError, match="enc_dim"):
        TranscriptionSystem(SystemConfig("stub", small_config(enc_dim=7)), encoder=StubEncoder())
    with pytest.raises(ValueError, match="stages"):
        TranscriptionSystem(SystemConfig("stub", {"onset": small_config()}),
                            encoder=StubEncoder())
    flat = TranscriptionSystem(SystemConfig("stub", "tiny", hierarchical=False),
                               encoder=StubEncoder(), decoder_device="meta")
    assert flat.stages == ("flat",)


def test_describe_parameters(monkeypatch):
    monkeypatch.setattr(system_mod, "build_encoder", lambda name: StubEncoder(embed_dim=1536))
    text = describe_parameters("base", "stub")
    print("\n" + text)
    for word in ("encoder (frozen)", "onset decoder", "velocity decoder", "offset decoder",
                 "attention", "mlp", "head", "system"):
        assert word in text
    assert "flat decoder" in describe_parameters("tiny", "stub", hierarchical=False)


@pytest.mark.parametrize("name, dim, frames", [("crnn", 1536, 1001), ("hppnet", 352, 501)])
def test_describe_parameters_real_encoders(name, dim, frames):
    """Also checks the encoder contract the decoders rely on (building is cheap; running the
    real encoders on a 2-core machine is not, so their outputs are tested beside them)."""
    text = describe_parameters("small", name)
    print("\n" + text)
    assert f"embed_dim {dim}, {frames} frames" in text and "offset decoder" in text
