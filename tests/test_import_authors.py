"""Converting the paper authors' stage decoders (export/authors.py).

Their code has no licence and is not a dependency, so `reference_logits` below is our own
forward of their `EncDecPos` state dict, written from the documented conventions: fused
projections, adjacent-pair RoPE on q and k in self-attention and on q only (at the token
index) in cross-attention, a 64-d sinusoidal frame PE through `pos_fc` added to the projected
embeddings, pre-norm self -> MLP -> cross -> MLP blocks, RMSNorm (eps 1e-5), SwiGLU, logits
over 6504 tokens. Random state dicts of their layout are drawn at O(1) scale so attention is
far from uniform and a wrong row permutation shows; the converted `Decoder` must give the
same logits (forward and KV-cached `step`), and skipping a permutation must not.
"""

from __future__ import annotations

import math
import pickle
import re
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from pianolm.export import authors  # noqa: E402
from pianolm.export.authors import (  # noqa: E402
    AUTHORS_VOCAB_SIZE,
    AuthorsImportError,
    authors_vocab_rows,
    convert_decoder,
    load_stage_checkpoint,
)
from pianolm.export.decoder import Decoder  # noqa: E402
from pianolm.export.frontend import ROLL_KEYS  # noqa: E402
from pianolm.runtime import vocab  # noqa: E402

torch.set_num_threads(1)

D, LAYERS, FRAMES = 64, 2, 40
# Max |difference| over max |logit|. Both sides run in float32; what differs is the rounding
# of the position tables (their RoPE angles are float32, ours are rounded from float64) and
# the order of the sums (SDPA vs explicit matmuls): ~1e-6 relative at these short sequences.
# 1e-4 holds with a wide margin, while a wrong permutation is off by O(1).
RTOL = 1e-4


# ---------------------------------------------------------------------------------------------
# The authors' layout and forward, ours from their conventions


def authors_state(enc_dim: int, seed: int = 0) -> dict[str, Tensor]:
    """A random `EncDecPos` state dict (2 layers, d 64), weights at O(1) scale."""
    g = torch.Generator().manual_seed(seed)
    hidden = 256  # their find_multiple(int(8 * 64 / 3), 256)

    def lin(out: int, inp: int) -> Tensor:
        return torch.randn(out, inp, generator=g) * 1.5 / math.sqrt(inp)

    def scale() -> Tensor:
        return 1.0 + 0.2 * torch.randn(D, generator=g)

    sd = {
        "transformer.wte.weight": torch.randn(AUTHORS_VOCAB_SIZE, D, generator=g),
        "lm_head.weight": lin(AUTHORS_VOCAB_SIZE, D),
        "audio_emb_to_emb.weight": lin(D, enc_dim),
        "audio_emb_to_emb.bias": 0.1 * torch.randn(D, generator=g),
        "pos_fc.weight": lin(D, 64),
        "pos_fc.bias": 0.1 * torch.randn(D, generator=g),
        "transformer.ln_f.scale": scale(),
    }
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        sd |= {f"{p}self_attn.c_attn.weight": lin(3 * D, D),
               f"{p}cross_attn.c_attn.weight": lin(D, D),
               f"{p}cross_attn.c_attn2.weight": lin(2 * D, D)}
        for side in ("self", "cross"):
            sd |= {f"{p}{side}_rms_1.scale": scale(), f"{p}{side}_rms_2.scale": scale(),
                   f"{p}{side}_attn.c_proj.weight": lin(D, D),
                   f"{p}{side}_mlp.c_fc1.weight": lin(hidden, D),
                   f"{p}{side}_mlp.c_fc2.weight": lin(hidden, D),
                   f"{p}{side}_mlp.c_proj.weight": lin(D, hidden)}
    return sd


def pair_rope(x: Tensor) -> Tensor:
    """x [B, n, H, hs]: rotate adjacent pairs (2j, 2j+1) by pos * 10000^(-2j/hs), float32."""
    n, hs = x.shape[1], x.shape[-1]
    theta = 1.0 / (10000.0 ** (torch.arange(0, hs, 2).float() / hs))
    angle = torch.outer(torch.arange(n).float(), theta)[None, :, None]  # [1, n, 1, hs/2]
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)


def rms(x: Tensor, scale: Tensor) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * scale


def swiglu(sd: dict[str, Tensor], p: str, x: Tensor) -> Tensor:
    gate = F.silu(x @ sd[f"{p}.c_fc1.weight"].T) * (x @ sd[f"{p}.c_fc2.weight"].T)
    return gate @ sd[f"{p}.c_proj.weight"].T


def attend(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """[B, n, H, hs] each -> [B, n, H * hs]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        n = scores.shape[-1]
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf)
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


def frame_pe(frames: int, dim: int = 64) -> Tensor:
    """Sinusoid per frame: sin at even, cos at odd columns."""
    pos = torch.arange(frames).float()[:, None]
    div = 10000.0 ** (torch.arange(0, dim, 2).float() / dim)
    pe = torch.zeros(frames, dim)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos / div), torch.cos(pos / div)
    return pe


def reference_logits(sd: dict[str, Tensor], n_heads: int, tokens: Tensor, emb: Tensor
                     ) -> Tensor:
    """Their decoder's teacher-forced logits [B, S, 6504] for their token ids [B, S]."""
    b, s = tokens.shape
    heads = (b, -1, n_heads, D // n_heads)
    audio = emb @ sd["audio_emb_to_emb.weight"].T + sd["audio_emb_to_emb.bias"]
    audio = audio + frame_pe(emb.shape[1]) @ sd["pos_fc.weight"].T + sd["pos_fc.bias"]
    x = sd["transformer.wte.weight"][tokens]
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        q, k, v = (rms(x, sd[f"{p}self_rms_1.scale"]) @ sd[f"{p}self_attn.c_attn.weight"].T
                   ).split(D, dim=-1)
        y = attend(pair_rope(q.view(heads)), pair_rope(k.view(heads)), v.view(heads), True)
        x = x + y @ sd[f"{p}self_attn.c_proj.weight"].T
        x = x + swiglu(sd, f"{p}self_mlp", rms(x, sd[f"{p}self_rms_2.scale"]))
        q = rms(x, sd[f"{p}cross_rms_1.scale"]) @ sd[f"{p}cross_attn.c_attn.weight"].T
        k, v = (audio @ sd[f"{p}cross_attn.c_attn2.weight"].T).split(D, dim=-1)
        y = attend(pair_rope(q.view(heads)), k.view(heads), v.view(heads), False)
        x = x + y @ sd[f"{p}cross_attn.c_proj.weight"].T
        x = x + swiglu(sd, f"{p}cross_mlp", rms(x, sd[f"{p}cross_rms_2.scale"]))
    return rms(x, sd["transformer.ln_f.scale"]) @ sd["lm_head.weight"].T


# ---------------------------------------------------------------------------------------------
# Sequences


def our_sequences() -> Tensor:
    """Two pianolm rows of one length, covering every token kind and the id extremes."""
    t, p, v = vocab.time_token, vocab.pitch_token, vocab.velocity_token
    onset = [vocab.SOS, vocab.TASK_ONSET, t(0), p(21), t(12), p(60), t(12), p(64),
             t(999), p(108), vocab.EOS]
    other = [vocab.SOS, vocab.TASK_VELOCITY, t(250), p(40), v(0), v(127), vocab.NOTE_SUSTAIN,
             t(1000), vocab.TASK_OFFSET, vocab.TASK_FLAT, vocab.PAD]
    return torch.tensor([onset, other])


def authors_strings() -> list[str]:
    """Their vocabulary as strings, re-derived from their tokenizer's documented blocks."""
    names = ["note_on", "note_off", "note_sustain", "pedal_on", "pedal_off", "pedal_sustain",
             "beat", "downbeat"]
    tasks = ["onset", "offset", "velocity", "flatten"]
    strings = ["<pad>", "<sos>", "<eos>", "<unk>"]
    strings += [f"name={n}" for n in names] + ["-"] * (100 - len(names))
    strings += [f"time={t}" for t in range(6001)] + ["label"] * 27
    strings += [f"pitch={i}" for i in range(128)] + [f"velocity={i}" for i in range(128)]
    strings += [f"beat_index={i}" for i in range(16)]
    return strings + [f"task={t}" for t in tasks] + ["-"] * (100 - len(tasks))


def test_vocab_rows_match_their_tokenizer() -> None:
    strings = authors_strings()
    assert len(strings) == AUTHORS_VOCAB_SIZE == 6504
    ours_as_theirs = {"pad": "<pad>", "sos": "<sos>", "eos": "<eos>", "task=flat": "task=flatten",
                      "note_sustain": "name=note_sustain"}
    rows = authors_vocab_rows()
    assert len(rows) == vocab.VOCAB_SIZE and len(set(rows)) == vocab.VOCAB_SIZE
    for token, row in enumerate(rows):
        name = vocab.describe(token)
        assert strings[row] == ours_as_theirs.get(name, name), (token, name)


# ---------------------------------------------------------------------------------------------
# Parity


def relative_error(ours: Tensor, reference: Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def converted(sd: dict[str, Tensor], n_heads: int, encoder: str) -> Decoder:
    cfg, state = convert_decoder(sd, n_heads, encoder)
    model = Decoder(cfg).eval()
    model.load_state_dict(state, strict=True)
    return model


def embeddings(encoder: str, batch: int) -> tuple[Tensor, Tensor]:
    """(ours, theirs) [B, T, E] of the same frames. HPPNet: pianolm concatenates the four
    [B, T, 88] rolls (onset, offset, frame, velocity: ROLL_KEYS); the authors stack (onset,
    frame, offset, velocity) as channels and flatten [T, 88, 4], key-major."""
    g = torch.Generator().manual_seed(7)
    if encoder == "crnn":
        emb = torch.randn(batch, FRAMES, 1536, generator=g)
        return emb, emb
    rolls = {k: torch.rand(batch, FRAMES, 88, generator=g) for k in ROLL_KEYS}
    theirs = torch.stack([rolls[k] for k in ("onset", "frame", "offset", "velocity")], dim=-1)
    return torch.cat([rolls[k] for k in ROLL_KEYS], dim=-1), theirs.flatten(2)


def parity_case(n_heads: int, encoder: str) -> tuple[Decoder, Tensor, Tensor, Tensor]:
    """(converted model, our tokens, embeddings, reference logits at our 1225 ids)."""
    sd = authors_state(authors.ENCODER_DIMS[encoder], seed=n_heads)
    tokens = our_sequences()
    ours_emb, their_emb = embeddings(encoder, tokens.shape[0])
    theirs = torch.tensor(authors_vocab_rows())[tokens]
    with torch.no_grad():
        ref = reference_logits(sd, n_heads, theirs, their_emb)[..., authors_vocab_rows()]
        model = converted(sd, n_heads, encoder)
    return model, tokens, ours_emb, ref


@pytest.mark.parametrize(("n_heads", "encoder"), [(4, "hppnet"), (8, "crnn"), (8, "hppnet")])
def test_converted_logits_match_reference(n_heads: int, encoder: str) -> None:
    model, tokens, emb, ref = parity_case(n_heads, encoder)
    with torch.no_grad():
        full = model(tokens, emb)
        # KV-cached: a 3-token prefill on an empty cache, then one token per step.
        cross, past = model.cross_kv(emb), model.empty_cache(tokens.shape[0])
        chunks, start = [], 0
        for end in [3, *range(4, tokens.shape[1] + 1)]:
            positions = torch.arange(start, end).expand(tokens.shape[0], -1)
            key_mask = torch.ones(tokens.shape[0], end, dtype=torch.bool)
            logits, past = model.step(tokens[:, start:end], positions, key_mask, past, cross)
            chunks.append(logits)
            start = end
    assert ref.abs().max() > 1.0  # O(1) weights: logits are not all near zero
    assert relative_error(full, ref) < RTOL
    assert relative_error(torch.cat(chunks, dim=1), ref) < RTOL


@pytest.mark.parametrize("skip", ["_rope_rows", "_hppnet_columns"])
def test_skipping_a_permutation_breaks_parity(skip: str, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    identity = {"_rope_rows": lambda d, h: torch.arange(d),
                "_hppnet_columns": lambda keys=88: torch.arange(4 * keys)}[skip]
    monkeypatch.setattr(authors, skip, identity)
    model, tokens, emb, ref = parity_case(4, "hppnet")
    with torch.no_grad():
        assert relative_error(model(tokens, emb), ref) > 100 * RTOL


def test_config_from_shapes() -> None:
    cfg, _ = convert_decoder(authors_state(1536), 8, "crnn")
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.enc_dim) == (LAYERS, D, 8, 1536)
    assert (cfg.cross_positions, cfg.look_ahead, cfg.time_head) == ("token", False, "lm")
    assert cfg.mlp_hidden == 256 and cfg.vocab_size == vocab.VOCAB_SIZE


# ---------------------------------------------------------------------------------------------
# Refusals


def convert_fails(sd: dict[str, Tensor], n_heads: int = 4, encoder: str = "hppnet") -> str:
    with pytest.raises(AuthorsImportError) as e:
        convert_decoder(sd, n_heads, encoder, source="step=1.pth")
    message = str(e.value)
    assert "\n" not in message and message.startswith("step=1.pth: ")
    return message


def test_malformed_state_dicts_are_named() -> None:
    sd = authors_state(352)
    key = "transformer.h.1.cross_attn.c_attn2.weight"
    assert f"1 missing: {key}" in convert_fails({k: v for k, v in sd.items() if k != key})
    assert "1 unexpected: extra.weight" in convert_fails({**sd, "extra.weight": torch.ones(1)})
    message = convert_fails({**sd, key: torch.zeros(3 * D, D)})
    assert f"1 shape mismatch: {key} [192, 64] (want [128, 64])" in message
    assert "missing transformer.wte.weight" in convert_fails(
        {k: v for k, v in sd.items() if k != "transformer.wte.weight"})
    assert "does not divide d_model 64" in convert_fails(sd, n_heads=3)
    assert "head size 1 is odd" in convert_fails(sd, n_heads=64)
    assert "352-d frames; the crnn encoder gives 1536" in convert_fails(sd, encoder="crnn")
    assert "unknown encoder" in convert_fails(sd, encoder="kong")


class PickledModule(nn.Module):
    """A whole module, as `torch.save(model)` writes it; unpickling it writes the marker."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 3)
        self.marker = str(marker)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        Path(self.marker).write_text("code from the file ran")


def test_loads_wrapped_state_dicts(tmp_path: Path) -> None:
    sd = {"a.weight": torch.ones(2, 2), "b.bias": torch.zeros(2)}
    for i, obj in enumerate([sd, {"model": sd, "step": 3}, {"state_dict": sd},
                             {"state_dict": {f"module.{k}": v for k, v in sd.items()}}]):
        torch.save(obj, tmp_path / f"{i}.pth")
        loaded = load_stage_checkpoint(tmp_path / f"{i}.pth")
        assert loaded.keys() == sd.keys()
        assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_pickled_module_needs_trust(tmp_path: Path) -> None:
    marker, path = tmp_path / "marker", tmp_path / "step=1.pth"
    torch.save(PickledModule(marker), path)
    with pytest.raises(AuthorsImportError) as e:
        load_stage_checkpoint(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(path))
    assert "pickled Python objects" in message and "--trust-pickle" in message
    assert "arbitrary code" in message and "PickledModule" in message
    assert not marker.exists()  # refused before any of the file's code ran

    state = load_stage_checkpoint(path, trust_pickle=True)
    assert marker.exists()  # trusted: the file's code did run
    assert sorted(state) == ["lin.bias", "lin.weight"]


def test_not_a_checkpoint(tmp_path: Path) -> None:
    for name, data in {"text.pth": b"hello", "empty.pth": b""}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(AuthorsImportError, match="not a PyTorch checkpoint"):
            load_stage_checkpoint(tmp_path / name)
    torch.save({"step": 3, "optimizer": {"lr": torch.ones(1)}}, tmp_path / "other.pth")
    with pytest.raises(AuthorsImportError, match="expected a state dict"):
        load_stage_checkpoint(tmp_path / "other.pth")
    with pytest.raises(AuthorsImportError, match="no such file"):
        load_stage_checkpoint(tmp_path / "absent.pth")
    (tmp_path / "plain.pth").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(AuthorsImportError):
        load_stage_checkpoint(tmp_path / "plain.pth")


# ---------------------------------------------------------------------------------------------
# `pianolm import authors`, end to end


def stage_files(folder: Path, enc_dim: int) -> tuple[dict, dict, list[str]]:
    """Three stage files of their layout in `folder` (random weights over an enc_dim-wide
    encoder): (files, state dicts, the `--onset F --velocity F --offset F` arguments)."""
    files = {stage: folder / f"step=1_{stage}.pth" for stage in vocab.STAGES}
    states = {stage: authors_state(enc_dim, seed=k) for k, stage in enumerate(vocab.STAGES)}
    for stage, path in files.items():
        torch.save(states[stage], path)
    return files, states, [a for stage, path in files.items() for a in (f"--{stage}", str(path))]


def test_import_authors_exports_graphs_that_give_the_converted_logits(kong_model, tmp_path,
                                                                       capsys) -> None:
    """Three stage files of their layout over Kong's CRNN (random weights, session fixture) ->
    a model folder whose ONNX graphs equal the converted PyTorch modules on random inputs
    (export/parity.py), and which transcribes with its LM stages."""
    pytest.importorskip("onnxscript")
    import numpy as np
    import soundfile as sf

    from pianolm.export.importing import main_import
    from pianolm.export.kong import load_kong_checkpoint
    from pianolm.export.parity import graph_parity
    from pianolm.export.system import SystemConfig, TranscriptionSystem
    from pianolm.runtime.cli import main
    from pianolm.runtime.manifest import load_manifest

    checkpoint = kong_model[0]
    files, states, args = stage_files(tmp_path, 1536)
    out = tmp_path / "model"
    assert main_import(["authors", *args, "--encoder", f"kong={checkpoint}", "--heads", "4",
                        "--out", str(out)]) == 0
    m = load_manifest(out)
    assert m.stage_names == vocab.STAGES and m.default_decoder == "lm"
    assert all(s.decoder.n_heads == 4 and s.decoder.enc_dim == 1536 for s in m.stages)
    assert [s.decoder.carried for s in m.stages] == ["after", "after", "separate"]
    assert m.source.metadata["importer"] == "authors"

    configs = {s: convert_decoder(states[s], 4, "crnn") for s in vocab.STAGES}
    encoder = load_kong_checkpoint(checkpoint)[0].note
    system = TranscriptionSystem(SystemConfig(encoder="crnn", decoder={
        s: cfg for s, (cfg, _) in configs.items()}), encoder=encoder)
    for s, (_, state) in configs.items():
        system.decoders[s].load_state_dict(state)
    for p in graph_parity(system.eval(), out, batch=2, samples=32000):
        assert p.max_rel < 1e-3, str(p)

    audio = tmp_path / "a.wav"
    sf.write(audio, 0.1 * np.sin(np.arange(48000) * 2 * np.pi * 440 / 16000), 16000)
    assert main(["transcribe", str(audio), "--model", str(out), "--decoder", "lm"]) == 0
    assert (tmp_path / "a.mid").is_file()

    # a stage trained on another encoder: one line naming its file
    torch.save(authors_state(352), files["offset"])
    assert main_import(["authors", *args, "--encoder", f"kong={checkpoint}", "--heads", "4",
                        "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(files["offset"]) in err and "352-d" in err

    # a pickled stage file is refused in one line unless trusted
    torch.save(PickledModule(tmp_path / "marker"), files["offset"])
    assert main_import(["authors", *args, "--encoder", f"kong={checkpoint}", "--heads", "4",
                        "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--trust-pickle" in err and not (tmp_path / "other" / "manifest.json").exists()
    assert not (tmp_path / "marker").exists()


def test_import_authors_with_an_encoder_per_stage(kong_model, tmp_path) -> None:
    """Their training fine-tunes a copy of the encoder with each stage: a stage given its own
    encoder file reads that encoder's embeddings (one encoder graph runs each distinct file once
    and concatenates; the stage's cross-KV graph reads its part), the rolls stay --encoder's,
    and a stage file given with the same bytes as --encoder costs no second pass."""
    pytest.importorskip("onnxscript")
    import numpy as np
    import onnxruntime as ort

    from pianolm.export.importing import main_import
    from pianolm.export.kong import load_kong_checkpoint, random_kong_state
    from pianolm.runtime.manifest import load_manifest

    checkpoint = kong_model[0]
    files, states, args = stage_files(tmp_path, 1536)
    tuned = tmp_path / "step=1_encoder.pth"  # Note_pedal.state_dict(), as their scripts save it
    torch.save({f"{part}.{k}": v for part, sd in random_kong_state(seed=5).items()
                for k, v in sd.items()}, tuned)
    same = tmp_path / "copy_of_kong.pth"
    same.write_bytes(checkpoint.read_bytes())
    out = tmp_path / "model"
    assert main_import(["authors", *args, "--encoder", f"kong={checkpoint}",
                        "--velocity-encoder", str(tuned), "--offset-encoder", str(same),
                        "--heads", "4", "--out", str(out)]) == 0
    m = load_manifest(out)
    assert m.encoder.parts == (1536, 1536)  # two distinct encoders, not three
    assert [(s.name, s.decoder.enc_offset, s.decoder.enc_dim) for s in m.stages] == [
        ("onset", 0, 1536), ("velocity", 1536, 1536), ("offset", 0, 1536)]

    rng = np.random.default_rng(0)
    wave = (0.1 * rng.normal(size=(1, 32000))).astype(np.float32)
    encoder = ort.InferenceSession(str(m.path(m.encoder.graph)))
    emb, onset_roll = encoder.run(["embeddings", "onset"], {"waveform": wave})
    with torch.inference_mode():
        base = load_kong_checkpoint(checkpoint)[0].note(torch.from_numpy(wave))
        own = load_kong_checkpoint(tuned)[0].note.embed(torch.from_numpy(wave))
    np.testing.assert_allclose(onset_roll, base.rolls["onset"].numpy(), atol=1e-4)
    for stage, reads in (("velocity", own), ("offset", base.embedding)):
        decoder = converted(states[stage], 4, "crnn")
        cross = ort.InferenceSession(str(m.path(m.stage(stage).cross_kv)))
        got = cross.run(["cross.0.key"], {"embeddings": emb})[0]
        with torch.inference_mode():
            want = decoder.cross_kv(reads).layers[0][0].numpy()
        assert relative_error(torch.from_numpy(got), torch.from_numpy(want)) < 1e-3, stage

    import soundfile as sf

    from pianolm.runtime.cli import main  # the runtime feeds the whole width to every stage

    sf.write(tmp_path / "a.wav", wave[0], 16000)
    assert main(["transcribe", str(tmp_path / "a.wav"), "--model", str(out)]) == 0
    assert (tmp_path / "a.mid").is_file()


def their_hppnet_key(ours: str) -> str:
    """pianolm's HPPNet key -> theirs (hppnet/nets.py: SubNet.trunk / heads[name].head, the
    harmonic convolutions conv_1..conv_8, a head's BiLSTM `lstm.rnn`)."""
    ours = ours.replace("subnets.0.", "subnet_onset.").replace("subnets.1.", "subnet_frame.")
    ours = re.sub(r"conv_3\.convs\.(\d)\.", lambda m: f"conv_3.conv_{int(m[1]) + 1}.", ours)
    return re.sub(r"heads\.(\w+)\.(lstm|linear)\.",
                  lambda m: f"heads.{m[1]}.head.{m[2]}{'.rnn' if m[2] == 'lstm' else ''}.", ours)


def test_import_authors_over_their_hppnet(tmp_path, capsys) -> None:
    """`--encoder hppnet=`: their HPPNet state dict (their key names) loads into pianolm's
    hppnet encoder, and the folder's graphs give the converted modules' outputs."""
    pytest.importorskip("onnxscript")
    from pianolm.export.hppnet import HPPNet
    from pianolm.export.importing import main_import
    from pianolm.export.parity import graph_parity
    from pianolm.export.system import SystemConfig, TranscriptionSystem

    torch.manual_seed(3)
    hpp = HPPNet().eval()
    encoder_file = tmp_path / "step=1_encoder.pth"
    torch.save({their_hppnet_key(k): v for k, v in hpp.state_dict().items()}, encoder_file)
    files, states, args = stage_files(tmp_path, 352)
    out = tmp_path / "model"
    assert main_import(["authors", *args, "--encoder", f"hppnet={encoder_file}", "--heads", "4",
                        "--out", str(out)]) == 0

    configs = {s: convert_decoder(states[s], 4, "hppnet") for s in vocab.STAGES}
    system = TranscriptionSystem(SystemConfig(encoder="hppnet", decoder={
        s: replace(cfg, carried="separate" if s == "offset" else "after")
        for s, (cfg, _) in configs.items()}), encoder=hpp)
    for s, (_, state) in configs.items():
        system.decoders[s].load_state_dict(state)
    for p in graph_parity(system.eval(), out, batch=1, samples=32000):
        assert p.max_rel < 1e-3, str(p)

    # a key of another model: one line naming the file and the key
    torch.save({**torch.load(encoder_file), "subnet_onset.extra.weight": torch.zeros(1)},
               encoder_file)
    assert main_import(["authors", *args, "--encoder", f"hppnet={encoder_file}", "--heads", "4",
                        "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(encoder_file) in err and "1 unexpected: subnets.0.extra.weight" in err


def test_import_authors_over_a_pianolm_folder(tmp_path, capsys) -> None:
    """`--encoder pianolm=DIR`: the folder's fp32 encoder graph is copied as it is (its rolls'
    thresholds and input peak with it), and the stages' graphs give the converted modules'."""
    pytest.importorskip("onnxscript")
    import numpy as np
    import soundfile as sf

    from pianolm.export.folder_encoder import FolderEncoder
    from pianolm.export.importing import main_import
    from pianolm.export.parity import graph_parity
    from pianolm.export.system import SystemConfig, TranscriptionSystem
    from pianolm.runtime.cli import main
    from pianolm.runtime.manifest import load_manifest

    shipped = Path(__file__).resolve().parents[1] / "engines" / "default"
    files, states, args = stage_files(tmp_path, 352)
    out = tmp_path / "model"
    assert main_import(["authors", *args, "--encoder", f"pianolm={shipped}", "--heads", "4",
                        "--out", str(out)]) == 0
    m, source = load_manifest(out), load_manifest(shipped)
    assert (out / "encoder.onnx").read_bytes() == (shipped / "encoder.onnx").read_bytes()
    assert m.encoder.rolls == source.encoder.rolls and m.input_peak == source.input_peak

    configs = {s: convert_decoder(states[s], 4, "hppnet") for s in vocab.STAGES}
    system = TranscriptionSystem(SystemConfig(encoder="hppnet", decoder={
        s: replace(cfg, carried="separate" if s == "offset" else "after")
        for s, (cfg, _) in configs.items()}), encoder=FolderEncoder(shipped))
    for s, (_, state) in configs.items():
        system.decoders[s].load_state_dict(state)
    for p in graph_parity(system.eval(), out, batch=1, samples=32000):
        assert p.max_rel < 1e-3, str(p)
    sf.write(tmp_path / "a.wav", np.zeros(24000, dtype=np.float32), 16000)
    assert main(["transcribe", str(tmp_path / "a.wav"), "--model", str(out)]) == 0

    # a folder serves every stage: a per-stage encoder file beside it is one line
    assert main_import(["authors", *args, "--encoder", f"pianolm={shipped}", "--onset-encoder",
                        str(files["onset"]), "--heads", "4", "--out",
                        str(tmp_path / "other")]) == 2
    assert "serves every stage" in capsys.readouterr().err
