"""LM training end to end on precomputed (here: random) embeddings: the segment re-gridding,
the token / loss-mask plumbing (a tiny decoder overfits two segments and greedy decoding then
reproduces their tokens exactly, for every stage), exact resume, and system assembly."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pianolm.export.decoder import Decoder, DecoderConfig
from pianolm.export.train.embeddings import load_items, write_index, write_item
from pianolm.export.train.examples import (
    EmbeddingStore,
    allowed_next,
    build_examples,
    clean_ticknotes,
    shifted_segments,
)
from pianolm.export.train.lm import (
    decode_scores,
    fit_prior_temperature,
    greedy_tokens,
    load_decoder,
    train_lm,
    validation_loss,
)
from pianolm.runtime import vocab as V
from pianolm.runtime.notes import Note
from pianolm.runtime.tokens import TickNote, encode, quantize, segment_notes

NOTES = [
    Note(0.50, 1.20, 60, 70), Note(0.50, 0.90, 64, 50), Note(1.30, 2.00, 62, 90),
    Note(3.00, 9.00, 48, 40), Note(5.25, 5.60, 72, 100), Note(8.00, 12.50, 55, 60),
    Note(9.50, 10.30, 67, 80), Note(10.40, 11.00, 69, 30), Note(12.00, 14.00, 71, 110),
    Note(15.00, 15.40, 74, 65), Note(18.50, 21.00, 50, 45), Note(19.90, 20.60, 76, 85),
]


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    rng = np.random.default_rng(0)
    entries = [write_item(root, split, f"{split}-000000", NOTES,
                          {0.0: rng.normal(size=(2, 51, 16)).astype(np.float16),
                           5.0: rng.normal(size=(2, 51, 16)).astype(np.float16)})
               for split in ("train", "validation")]
    write_index(root, entries, "stub", embed_dim=16, frames_per_segment=51,
                frames_per_second=5.0, shifts=(0.0, 5.0))
    return root


def test_clean_ticknotes_obeys_the_grammar():
    notes = [TickNote(10, 50, 60, 40), TickNote(10, 30, 60, 90), TickNote(40, 80, 60, 70)]
    assert clean_ticknotes(notes) == [TickNote(10, 30, 60, 90), TickNote(40, 80, 60, 70)]


def test_grid_shift_zero_matches_plain_segmentation():
    plain = segment_notes(quantize(NOTES), 2)
    for a, b in zip(shifted_segments(NOTES, 0.0, 2), plain):
        for stage in ("onset", "velocity", "offset", "flat"):
            assert encode(stage, a) == encode(stage, b)


def test_grid_shift_moves_notes_and_carries():
    seg0, seg1 = shifted_segments(NOTES, 5.0, 2)  # covering [5, 15) and [15, 25) s
    own = [(n.onset_tick - seg0.start, n.pitch) for n in seg0.own]
    assert own == [(25, 72), (300, 55), (450, 67), (540, 69), (700, 71)]
    assert [n.pitch for n in seg0.carried] == [48]  # sounding at 5 s, struck before
    assert [(n.onset_tick - seg1.start, n.pitch) for n in seg1.own] == [(0, 74), (350, 50),
                                                                          (490, 76)]
    assert seg1.carried == []  # 55 and 71 end at 12.5 s and 14 s, inside segment 0


def test_examples_cover_every_segment_and_shift(emb_dir):
    items = load_items(emb_dir, "train")
    ex, skipped = build_examples(items, "offset", None, 2048)
    assert skipped == 0 and [(e.shift, e.row) for e in ex] == [(0.0, 0), (0.0, 1), (5.0, 0),
                                                               (5.0, 1)]
    ex0, _ = build_examples(items, "offset", (0.0,), 2048)
    assert len(ex0) == 2
    assert V.NOTE_SUSTAIN in ex0[1].tokens.tolist()  # carried notes in segment 1


@pytest.fixture(autouse=True)
def one_thread():
    # 2 shared cores: several threads per process oversubscribe them and run 10x slower
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _opts(**kw):
    opts = dict(preset="tiny", batch=2, lr=4e-3, warmup_steps=5, min_lr_ratio=0.1,
                weight_decay=0.0, emb_dropout=0.0, shifts=(0.0,), val_every=0, save_every=0,
                log_every=10, quiet=True)
    opts.update(kw)
    return opts


@pytest.mark.parametrize("stage", ["onset", "velocity", "offset", "flat"])
def test_overfit_two_segments_then_greedy_decode_reproduces_them(stage, emb_dir, tmp_path):
    torch.manual_seed(0)
    out = tmp_path / stage
    result = train_lm(stage, str(emb_dir), out, steps=80, **_opts())
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert losses[-1] < 0.05 < losses[0], losses
    decoder, meta = load_decoder(out, best=False)
    assert meta["stage"] == stage and meta["step"] == result["step"] == 80
    items = load_items(emb_dir, "train")
    examples, _ = build_examples(items, stage, (0.0,), 2048)
    scores = decode_scores(stage, decoder, examples, EmbeddingStore(items))
    assert scores["exact"] == 1.0, scores
    metric = {"onset": "onset_f", "velocity": "onset_offset_velocity_f",
              "offset": "onset_offset_f", "flat": "onset_offset_velocity_f"}[stage]
    assert scores[metric] == 1.0


def test_resume_equals_uninterrupted(emb_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    opts = _opts(log_every=1, shifts=None, emb_dropout=0.1, warmup_steps=2, min_lr_ratio=0.1,
                 val_every=3, val_split="validation", val_segments=2, decode_segments=1)
    train_lm("velocity", str(emb_dir), a, steps=6, **opts)
    assert not train_lm("velocity", str(emb_dir), b, steps=6, until_step=4, **opts)["finished"]
    assert train_lm(out_dir=b, resume=True, quiet=True)["step"] == 6

    def log(p):
        return [(r["kind"], r["step"], r.get("loss", r.get("val_loss")))
                for r in map(json.loads, (p / "log.jsonl").read_text().splitlines())]
    assert log(a) == log(b)
    sa = torch.load(a / "state.pt", weights_only=False)
    sb = torch.load(b / "state.pt", weights_only=False)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    assert sa["sampler"] == sb["sampler"]


def test_init_from_another_run(emb_dir, tmp_path):
    """--init starts a new run (step 0, fresh optimizer) from another run's best weights, of
    the same stage or another; a run of another size is refused."""
    src = tmp_path / "src"
    train_lm("offset", str(emb_dir), src, steps=3, **_opts())
    want, _ = load_decoder(src)
    dst = tmp_path / "dst"
    train_lm("offset", str(emb_dir), dst, steps=0, init_from=str(src), **_opts())
    got, meta = load_decoder(dst, best=False)
    assert meta["step"] == 0 and meta["train_config"]["init_from"] == str(src)
    assert all(torch.equal(got.state_dict()[k], v) for k, v in want.state_dict().items())
    other = tmp_path / "other-stage"
    train_lm("velocity", str(emb_dir), other, steps=0, init_from=str(src), **_opts())
    got, meta = load_decoder(other, best=False)
    assert meta["stage"] == "velocity"
    assert all(torch.equal(got.state_dict()[k], v) for k, v in want.state_dict().items())
    with pytest.raises(ValueError, match="--init .*a decoder of another size"):
        train_lm("offset", str(emb_dir), tmp_path / "y", steps=0, init_from=str(src),
                 **_opts(preset="mini"))


def test_init_from_committed_fp16_weights(emb_dir, tmp_path):
    """On a fresh machine only a run's committed folder is left (decoder.json and its best
    weights in fp16, benchmarks/results/): --init takes it, in fp32."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    train_lm("onset", str(emb_dir), src, steps=3, **_opts())
    committed = tmp_path / "committed"
    committed.mkdir()
    shutil.copy(src / "decoder.json", committed)
    half = {k: v.half() for k, v in load_file(str(src / "decoder.safetensors")).items()}
    save_file(half, str(committed / "best.fp16.safetensors"))
    dst = tmp_path / "dst"
    train_lm("onset", str(emb_dir), dst, steps=0, init_from=str(committed), **_opts())
    got, _ = load_decoder(dst, best=False)
    assert all(v.dtype == torch.float32 and torch.equal(v, half[k].float())
               for k, v in got.state_dict().items())


def test_align_time_embeddings():
    from pianolm.export.decoder import Decoder, DecoderConfig
    from pianolm.export.train.lm import align_time_embeddings

    torch.manual_seed(0)
    d = Decoder(DecoderConfig.from_preset("tiny", 16))
    before = d.tok_emb.weight.detach().clone()
    align_time_embeddings(d, frames_per_second=50.0)
    w = d.tok_emb.weight.detach()
    t = V.TIME_BASE
    assert torch.equal(w[:t], before[:t]) and torch.equal(w[V.PITCH_BASE:], before[V.PITCH_BASE:])
    assert torch.equal(w[t + 300], w[t + 301])  # ticks 300 and 301 share frame 150
    with torch.no_grad():
        want = d.audio_pe_proj(d.audio_pe[150])
    cos = torch.nn.functional.cosine_similarity(w[t + 300], want, dim=0)
    assert cos > 0.9999
    assert abs(float(w[t:V.PITCH_BASE].std()) - float(before.std())) < 0.1 * float(before.std())


def test_mix_embeddings(emb_dir, tmp_path):
    from pianolm.export.train.embeddings import mix_embeddings

    oracle = tmp_path / "oracle"
    rng = np.random.default_rng(1)
    entries = [write_item(oracle, split, f"{split}-000000", NOTES[:6],
                          {0.0: rng.normal(size=(2, 51, 16)).astype(np.float16)})
               for split in ("train", "validation")]
    write_index(oracle, entries, "oracle", embed_dim=16, frames_per_segment=51,
                frames_per_second=5.0)
    mixed = tmp_path / "mixed"
    index = mix_embeddings(mixed, [(oracle, 1), (emb_dir, 3)], [emb_dir])
    assert index["encoder"] == "oracle+stub" and index["shifts"] == [0.0, 5.0]
    train, val = load_items(mixed, "train"), load_items(mixed, "validation")
    assert len(train) == 4 and len(val) == 1  # 1 oracle + 3 x 1 real; real validation only
    assert len({it.id for it in train}) == 4
    assert all(f.is_file() for it in train + val for f in it.files.values())
    assert len(val[0].notes) == len(NOTES) and len(train[0].notes) == 6
    out = train_lm("onset", str(mixed), tmp_path / "run", steps=2, **_opts())
    assert out["step"] == 2

    # the encoder's weights are kept for assemble's check when the real sources agree on them
    def real_copy(name: str, sha: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(emb_dir, folder)
        index = json.loads((folder / "index.json").read_text())
        index["source"] = {"encoder_dir": name, "sha256": sha}
        (folder / "index.json").write_text(json.dumps(index))
        return folder

    a, b, c = real_copy("real-a", "abc"), real_copy("real-b", "abc"), real_copy("real-c", "def")
    assert mix_embeddings(tmp_path / "m1", [(oracle, 1), (a, 2)], [b])["source"]["sha256"] == "abc"
    assert mix_embeddings(tmp_path / "m2", [(a, 1), (c, 1)], [b])["source"] == {}

    write_index(oracle, entries, "oracle", embed_dim=8, frames_per_segment=51,
                frames_per_second=5.0)
    with pytest.raises(ValueError, match="does not match"):
        mix_embeddings(tmp_path / "bad", [(oracle, 1), (emb_dir, 1)], [emb_dir])


def test_assemble_system_checkpoint(tmp_path):
    from pianolm.export.checkpoint import load_system
    from pianolm.export.encoders import build_encoder
    from pianolm.export.train.assembly import assemble_system
    from pianolm.export.train.encoder import save_encoder

    torch.manual_seed(0)
    encoder = build_encoder("hppnet")
    enc_dir = tmp_path / "enc"
    save_encoder(encoder, "hppnet", enc_dir, {"rolls": {"onset_threshold": 0.4}})
    root = tmp_path / "emb"
    emb = {0.0: np.zeros((1, encoder.frames_per_segment, encoder.embed_dim), np.float16)}
    entry = write_item(root, "train", "train-0", NOTES[:5], emb)
    write_index(root, [entry], "hppnet", encoder.embed_dim, encoder.frames_per_segment, 50.0)
    dirs = {}
    for stage in V.STAGES:
        dirs[stage] = tmp_path / stage
        train_lm(stage, str(root), dirs[stage], steps=1, **_opts(batch=1))
    out = assemble_system(enc_dir, dirs, tmp_path / "system", best=False)
    system = load_system(out)
    assert system.stages == V.STAGES
    for stage in V.STAGES:
        want, _ = load_decoder(dirs[stage], best=False)
        got = system.decoders[stage].state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.state_dict().items())
    meta = json.loads((out / "config.json").read_text())["metadata"]
    assert meta["rolls"] == {"onset_threshold": 0.4}


def test_cli_parses_every_subcommand():
    from pianolm.export.train import build_parser

    p = build_parser()
    a = p.parse_args(["encoder", "--out", "x", "--data", "d", "--encoder", "crnn", "--steps",
                      "5", "--no-devset", "--binary-targets"])
    assert (a.encoder_name, a.steps, a.devset, a.soft_targets) == ("crnn", 5, "none", False)
    assert not hasattr(a, "lr")  # unset options stay unset (a resumed run keeps its own)
    a = p.parse_args(["lm", "--out", "x", "--resume"])
    assert a.resume and not hasattr(a, "stage")
    a = p.parse_args(["embed", "--data", "d", "--encoder-dir", "e", "--out", "o", "--shifts",
                      "0", "5"])
    assert a.shifts == [0.0, 5.0]
    a = p.parse_args(["mix", "--out", "m", "--train", "o:1", "e:4", "--validation", "e"])
    assert a.train == ["o:1", "e:4"] and a.validation == ["e"]
    a = p.parse_args(["assemble", "--encoder-dir", "e", "--onset", "a", "--velocity", "b",
                      "--offset", "c", "--out", "o"])
    assert a.onset == "a" and a.flat is None
    assert p.parse_args(["tune-rolls", "--encoder-dir", "e", "--data", "d"]).items == 32


@pytest.fixture(scope="module")
def rolls_dir(tmp_path_factory):
    """Embeddings as wide as the rolls (4 x 88), random: what a roll-prior stage reads."""
    root = tmp_path_factory.mktemp("rolls")
    rng = np.random.default_rng(1)
    entries = [write_item(root, split, f"{split}-000000", NOTES,
                          {0.0: rng.random((3, 51, 352)).astype(np.float16)})
               for split in ("train", "validation")]
    write_index(root, entries, "stub", embed_dim=352, frames_per_segment=51,
                frames_per_second=5.0, shifts=(0.0,))
    return root


PRIOR = dict(cross_positions="time", look_ahead=True, time_head="pointer", roll_prior=True)


def test_roll_prior_trains_its_scales_faster_and_resumes(rolls_dir, tmp_path):
    """A roll-prior stage (export/roll_prior.py) trains on rolls-as-embeddings: its few scales
    sit in their own optimizer group at --prior-lr-scale x the rate, and a resumed run equals
    an uninterrupted one."""
    opts = _opts(log_every=1, shifts=None, warmup_steps=1, val_every=0, decode_segments=0,
                 prior_lr_scale=30.0, **PRIOR)
    a, b = tmp_path / "a", tmp_path / "b"
    train_lm("onset", str(rolls_dir), a, steps=4, **opts)
    train_lm("onset", str(rolls_dir), b, steps=4, until_step=2, **opts)
    train_lm(out_dir=b, resume=True, quiet=True)
    sa = torch.load(a / "state.pt", weights_only=False)
    sb = torch.load(b / "state.pt", weights_only=False)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    groups = sa["optimizer"]["param_groups"]
    assert [g.get("lr_scale", 1.0) for g in groups] == [1.0, 1.0, 30.0]
    decoder, _ = load_decoder(a, best=False)
    assert decoder.cfg.roll_prior == "onset" and decoder.prior.threshold.item() != 0.0


def _onset_example() -> np.ndarray:
    (seg, *_) = shifted_segments(NOTES, 0.0, 2)
    return np.asarray(encode("onset", seg)[0], np.int64)[None]


def test_allowed_next_is_what_greedy_decoding_chooses_among():
    """The constrained loss's mask: after a time token a pitch (never a time or eos), after a
    pitch a time no earlier than its tick or eos; the reference token always."""
    tokens = _onset_example()
    allowed = allowed_next("onset", tokens, V.query_ticks(tokens[:, :-1]))
    targets = tokens[0, 1:]
    assert allowed[0, np.arange(len(targets)), targets].all()
    for i in range(1, len(targets)):
        token = int(tokens[0, i])
        if V.TIME_BASE <= token < V.PITCH_BASE:  # a time was fed: a pitch comes next
            assert allowed[0, i, V.PITCH_BASE:V.VELOCITY_BASE].any()
            assert not allowed[0, i, :V.PITCH_BASE].any()
        elif V.PITCH_BASE <= token < V.VELOCITY_BASE:
            tick = int(tokens[0, i - 1]) - V.TIME_BASE
            assert allowed[0, i, V.EOS]
            assert not allowed[0, i, V.TIME_BASE:V.TIME_BASE + tick].any()
            assert allowed[0, i, V.TIME_BASE + tick + V.MIN_PITCH // 10:V.PITCH_BASE - 1].any()
            assert not allowed[0, i, V.PITCH_BASE:].any()
    # the offset stage: a note ends after its onset, or sustains
    (seg, *_) = shifted_segments(NOTES, 0.0, 2)
    off = np.asarray(encode("offset", seg)[0], np.int64)[None]
    ticks = V.query_ticks(off[:, :-1])
    ends = allowed_next("offset", off, ticks)
    at = [i for i in range(1, off.shape[1] - 1)
          if V.PITCH_BASE <= off[0, i] < V.VELOCITY_BASE]
    assert at
    for i in at:
        tick = int(ticks[0, i])
        assert ends[0, i, V.NOTE_SUSTAIN] and ends[0, i, V.TIME_BASE + tick + 1]
        assert not ends[0, i, V.TIME_BASE:V.TIME_BASE + tick + 1].any()


def test_constrained_loss_fits_the_prior_without_changing_its_choices(rolls_dir):
    """Over the grammar's tokens the loss is lower than over the vocabulary; tempering a new
    roll-prior stage lowers it further and leaves every greedy token as it was."""
    items = load_items(rolls_dir, "train")
    examples, _ = build_examples(items, "onset", None, 2048)
    store = EmbeddingStore(items)
    cfg = DecoderConfig.from_preset("tiny", 352, ticks_per_frame=20, roll_prior="onset",
                                    cross_positions="time", look_ahead=True,
                                    time_head="pointer")
    torch.manual_seed(0)
    decoder = Decoder(cfg)
    decoder.start_from_the_rolls()
    whole = validation_loss(decoder, examples, store, 2)["val_loss"]
    constrained = validation_loss(decoder, examples, store, 2, "onset")["val_loss"]
    assert constrained < whole

    def greedy() -> list[list[int]]:
        emb = np.stack([store.get(e.item, e.shift, e.row) for e in examples])
        return greedy_tokens("onset", decoder, emb, [e.segment for e in examples], 64)

    before = greedy()
    factor = fit_prior_temperature(decoder, examples, store, 2, "onset")
    assert factor < 1.0  # the calibrated terms are sharper than random rolls are right
    assert validation_loss(decoder, examples, store, 2, "onset")["val_loss"] < constrained
    assert greedy() == before


def test_best_by_decode_starts_from_the_start(rolls_dir, tmp_path):
    """--best-by decode validates before the first step (the prior's start is a candidate),
    and records how best.safetensors was chosen."""
    out = tmp_path / "run"
    train_lm("onset", str(rolls_dir), out, steps=2, **_opts(
        shifts=None, val_every=2, val_segments=2, decode_segments=2, best_by="decode",
        constrained_loss=True, fit_temperature=True, **PRIOR))
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "val"] == [0, 2]
    assert [r["kind"] for r in rows][:2] == ["data", "prior"]
    _, meta = load_decoder(out)
    assert meta["best_by"] == "decode" and (out / "best.safetensors").is_file()
    with pytest.raises(ValueError, match="decode_segments"):
        train_lm("onset", str(rolls_dir), tmp_path / "x", steps=1,
                 **_opts(best_by="decode", decode_segments=0, **PRIOR))
