"""Encoder training on a stub encoder and a tiny synthetic dataset: losses fall, a resumed run
equals an uninterrupted one, validation / threshold tuning / embedding precomputation run."""

import json

import numpy as np
import pytest
import torch

from pianolm.export.train.embeddings import embed_dataset, load_embeddings_index, load_items
from pianolm.export.train.encoder import (
    parse_loss_weights,
    read_encoder_meta,
    roll_losses,
    train_encoder,
)
from pianolm.export.train.examples import CropSource, make_batch
from pianolm.export.train.targets import TargetConfig
from pianolm.export.train.thresholds import tune_rolls
from pianolm.runtime.audio import segment_audio
from tests.train_stub import StubEncoder, make_dataset


@pytest.fixture(autouse=True)
def one_thread():
    # 2 shared cores: several threads per process oversubscribe them and run 10x slower
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def _stub(fps=100):
    torch.manual_seed(0)
    return StubEncoder(fps)


def test_overfits_a_repeated_batch(dataset):
    model = _stub()
    src = CropSource(dataset, "train")
    rng = np.random.default_rng(0)
    wave, targets = make_batch(src, rng, 2, 16000, model.num_frames(16000), TargetConfig(100.0))
    assert wave.shape == (2, 16000) and targets["onset"].shape == (2, 101, 88)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = roll_losses(model(wave).rolls, targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_loss_weights_scale_their_roll_in_the_sum(dataset):
    model = _stub()
    src = CropSource(dataset, "train")
    wave, targets = make_batch(src, np.random.default_rng(1), 2, 16000,
                               model.num_frames(16000), TargetConfig(100.0))
    with torch.no_grad():
        rolls = model(wave).rolls
        plain = roll_losses(rolls, targets)
        weighted = roll_losses(rolls, targets, parse_loss_weights("offset=3,frame=0"))
    assert torch.isclose(weighted["loss"], plain["loss"] + 2 * plain["offset"] - plain["frame"])
    assert all(torch.equal(weighted[k], plain[k]) for k in ("onset", "offset", "frame"))


@pytest.mark.parametrize("bad", ["offset", "pedal=2", "offset=x", "offset=-1", "onset=nan"])
def test_bad_loss_weights_are_refused(bad):
    with pytest.raises(ValueError, match="ROLL=WEIGHT"):
        parse_loss_weights(bad)


def test_bad_loss_weights_fail_in_one_line(dataset, tmp_path, capsys):
    from pianolm.export.train import main_train

    with pytest.raises(SystemExit) as e:
        main_train(["encoder", "--data", str(dataset), "--out", str(tmp_path / "run"),
                    "--loss-weights", "offset=x"])
    assert e.value.code == 2
    assert "--loss-weights: 'offset=x' is not ROLL=WEIGHT" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _run(out, dataset, **kw):
    opts = dict(data_root=str(dataset), encoder_name="stub", out_dir=out, steps=4, batch=2,
                crop_seconds=1.0, lr=3e-3, warmup_steps=2, val_every=0, save_every=0,
                log_every=1, devset="none", quiet=True)
    opts.update(kw)
    return train_encoder(encoder=_stub(), **opts)


def _train_losses(out):
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_resume_equals_uninterrupted(dataset, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a, dataset)
    first = _run(b, dataset, until_step=2)
    assert first["step"] == 2 and not first["finished"]
    second = train_encoder(out_dir=b, resume=True, encoder=_stub(), quiet=True)
    assert second["step"] == 4 and second["finished"]
    assert _train_losses(a) == _train_losses(b)  # same losses at every step, exactly
    sa = torch.load(a / "state.pt", weights_only=False)["model"]
    sb = torch.load(b / "state.pt", weights_only=False)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_validation_tuning_and_embeddings(dataset, tmp_path):
    out = tmp_path / "enc"
    _run(out, dataset, steps=2, val_every=2, val_items=1)
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["kind"] == "val"]
    assert len(val) == 1 and {"frame_f", "onset_f", "loss_onset"} <= set(val[0])
    assert (out / "best.safetensors").is_file()

    result = tune_rolls(out, dataset, n_items=1, encoder=_stub(), devset="none", quiet=True)
    assert read_encoder_meta(out)["rolls"] == result["rolls"]

    # precompute embeddings with two grid shifts; 12 s pieces -> 2 segments (+1 at 5 s)
    model = _stub(50)
    emb_dir = tmp_path / "emb"
    index = embed_dataset(dataset, None, emb_dir, shifts=(0.0, 5.0), encoder=model,
                          encoder_name="stub", quiet=True)
    assert index["embed_dim"] == 16 and index["frames_per_segment"] == 501
    items = load_items(emb_dir, "train")
    assert len(items) == 3 and set(items[0].files) == {0.0, 5.0}
    assert items[0].segments(0.0).shape == (2, 501, 16)
    assert items[0].segments(5.0).shape == (1, 501, 16)
    assert items[0].segments(0.0).dtype == np.float16
    from pianolm.export.data.dataset import load_index, load_item

    entry = load_index(dataset)["items"][0]
    audio, _, _ = load_item(dataset, entry)
    with torch.no_grad():
        want = model.embed(torch.from_numpy(segment_audio(audio[5 * 16000:]))).numpy()
    np.testing.assert_allclose(items[0].segments(5.0)[0].astype(np.float32), want[0],
                               atol=2e-3, rtol=2e-3)
    val_entry = next(it for it in load_embeddings_index(emb_dir)["items"]
                     if it["split"] == "validation")
    assert np.load(emb_dir / val_entry["rolls"]).shape == (2, 501, 352)
    # a second run skips finished pieces
    mtime = items[0].files[0.0].stat().st_mtime_ns
    embed_dataset(dataset, None, emb_dir, shifts=(0.0, 5.0), encoder=model, quiet=True)
    assert items[0].files[0.0].stat().st_mtime_ns == mtime


def test_held_out_validation_reports_each_piano_and_chooses_on_it(dataset, tmp_path):
    held_out = make_dataset(tmp_path / "held", n_train=0, n_val=2, seed=5,
                            pianos=("piano-a", "piano-b"))
    out = tmp_path / "enc"
    _run(out, dataset, steps=2, val_every=2, val_items=2, validation=str(held_out),
         best_metric="onset_offset_f")
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["kind"] == "val"][0]
    assert set(val["pianos"]) == {"piano-a", "piano-b"}
    assert {"onset_f", "onset_offset_f", "onset_offset_velocity_f"} <= set(val["pianos"]["piano-a"])
    state = torch.load(out / "state.pt", weights_only=False)
    assert state["best_f"] == val["onset_offset_f"]  # the best is held-out onset+offset F1
    # per piano = that piano's pieces alone: two pianos, one piece each
    both = np.mean([val["pianos"][k]["onset_f"] for k in ("piano-a", "piano-b")])
    assert both == pytest.approx(val["onset_f"])

    result = tune_rolls(out, f"{dataset},{held_out}", n_items=2, encoder=_stub(),
                        devset="none", quiet=True)
    assert set(result["validation"]["pianos"]) == {"piano-a", "piano-b"}
    assert read_encoder_meta(out)["rolls_tuned_on"]["items"] == 3  # 1 + 2 pieces


def test_fine_tuning_one_head_moves_that_head_only(dataset, tmp_path):
    """--init RUN --train-only velocity: starts from the run's weights; only the velocity
    head's parameters change, so the other rolls (and their embedding columns) stay put."""
    from pianolm.export.encoders import build_encoder
    from pianolm.export.train.encoder import head_parameters, load_encoder, save_encoder

    torch.manual_seed(0)
    base = build_encoder("hppnet-cpu")
    save_encoder(base, "hppnet-cpu", tmp_path / "base")
    train_encoder(data_root=str(dataset), encoder_name="hppnet-cpu", out_dir=tmp_path / "ft",
                  steps=2, batch=1, crop_seconds=4.0, lr=1e-2, warmup_steps=0, val_every=0,
                  save_every=0, devset="none", quiet=True, init_from=str(tmp_path / "base"),
                  train_only="velocity")
    tuned, _ = load_encoder(tmp_path / "ft")
    before, after = base.state_dict(), tuned.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(".heads.velocity." in k for k in moved), sorted(moved)
    with pytest.raises(ValueError, match="unknown roll head"):
        head_parameters(base, ["pedal"])
    with pytest.raises(ValueError, match="no separate parameters"):
        head_parameters(_stub(), ["velocity"])  # one Linear makes all four rolls


def test_key_levels_read_each_key_and_its_offsets():
    """The level-aware velocity head's extra inputs: channel j at key k is the scaled level
    (loudest of the key's CQT bins) of key k + offsets[j]; past the keyboard, LEVEL_FLOOR."""
    from pianolm.export.hppnet import LEVEL_FLOOR, LEVEL_OFFSET_DB, LEVEL_SCALE_DB, key_levels

    db = torch.randn(2, 1, 7, 352) * 20
    levels = key_levels(db, 4, (-12, 0, 19))
    assert levels.shape == (2, 3, 7, 88)
    own = (db.reshape(2, 1, 7, 88, 4).amax(-1)[:, 0] + LEVEL_OFFSET_DB) / LEVEL_SCALE_DB
    assert torch.allclose(levels[:, 1], own)
    assert torch.allclose(levels[:, 0, :, 12:], own[..., :-12])
    assert torch.allclose(levels[:, 2, :, :-19], own[..., 19:])
    assert (levels[:, 0, :, :12] == LEVEL_FLOOR).all()
    assert (levels[:, 2, :, -19:] == LEVEL_FLOOR).all()


def test_level_aware_encoder_starts_from_a_plain_run(tmp_path):
    """--init from an "hppnet-cpu" run into "hppnet-cpu-vl": the velocity head's new input
    weights start at zero, so every roll equals the plain run's; those weights then train."""
    from pianolm.export.encoders import build_encoder
    from pianolm.export.train.encoder import load_init_weights, save_encoder

    torch.manual_seed(0)
    base = build_encoder("hppnet-cpu").eval()
    save_encoder(base, "hppnet-cpu", tmp_path / "base")
    vl = build_encoder("hppnet-cpu-vl").eval()
    load_init_weights(vl, tmp_path / "base")
    wave = 0.1 * torch.randn(1, 24000)
    with torch.inference_mode():
        a, b = base(wave).rolls, vl(wave).rolls
    assert all(torch.equal(a[k], b[k]) for k in a)
    w = vl.state_dict()["subnets.1.heads.velocity.lstm.weight_ih_l0"]
    assert w.shape[1] == 64 + 5 and not w[:, 64:].any()


def test_crops_are_scaled_as_the_runtime_scales_their_whole_file(dataset):
    """CropSource(input_peak=p): a crop gets the gain that brings its whole item to peak p."""
    from pianolm.export.train.examples import CropSource

    plain, scaled = CropSource(dataset, "train"), CropSource(dataset, "train", input_peak=0.5)
    for seed in range(3):
        x, _, start = plain.sample(np.random.default_rng(seed), 16000)
        y, _, start2 = scaled.sample(np.random.default_rng(seed), 16000)
        i = int(np.random.default_rng(seed).integers(len(plain)))
        whole = plain.read(i, 0, plain._length(i)[0])
        assert start == start2 and plain.peak(i) == np.max(np.abs(whole)) > 0
        assert np.allclose(y, x * (0.5 / plain.peak(i)), atol=1e-7)
