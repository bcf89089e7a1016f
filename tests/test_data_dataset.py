"""The rendered-dataset layout: render a tiny set (2 processes), read it back, resume, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from pianolm.export.data import dataset as D
from pianolm.export.data.render import available_instruments

FAST = [k for k in ("timgm6mb", "freepats", "salamander") if available_instruments()[k] is None]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    if not FAST:
        print("skip: no fast renderer installed (scripts/install_renderers.sh)")
        pytest.skip("no fast renderer installed")
    root = tmp_path_factory.mktemp("rendered")
    index = D.render_dataset(root, n_pieces=4, seconds=3.0, seed=11, instruments=FAST,
                             workers=2, val_fraction=0.25, corpus_fraction=0.0)
    return root, index


def test_layout_and_index(rendered):
    root, index = rendered
    assert index["counts"] == {"train": 3, "validation": 1}
    assert json.loads((root / "index.json").read_text()) == index
    assert D.load_index(root)["items"] == index["items"]
    for e in index["items"]:
        for key in ("audio", "notes", "pedal"):
            assert (root / e[key]).is_file(), e[key]
        info = sf.info(root / e["audio"])
        assert info.samplerate == 16000 and info.channels == 1
        assert info.frames == 3 * 16000
        assert e["instrument"] in FAST and e["source"] == "generated"
        audio, notes, pedal = D.load_item(root, e)
        assert audio.dtype == np.float32 and 0 < np.abs(audio).max() <= 1.0
        assert len(notes) == e["n_notes"] > 0 and len(pedal) == e["n_pedal"]
        assert all(n.onset < 3.0 for n in notes)
        assert all(d < u for d, u in pedal)


def test_resume_and_determinism(rendered, tmp_path):
    root, index = rendered
    first = index["items"][0]
    before = (root / first["audio"]).stat().st_mtime_ns
    again = D.render_dataset(root, n_pieces=4, seconds=3.0, seed=11, instruments=FAST,
                             workers=1, val_fraction=0.25, corpus_fraction=0.0)
    assert (root / first["audio"]).stat().st_mtime_ns == before  # skipped, not re-rendered
    assert [e["id"] for e in again["items"]] == [e["id"] for e in index["items"]]
    # the same job in a fresh folder gives the same labels and audio
    job = D.plan_jobs(4, 3.0, 11, FAST, 0.25, 0.0)[0]
    entry = D.render_item(job, tmp_path)
    assert (tmp_path / entry["notes"]).read_text() == (root / first["notes"]).read_text()
    a, _ = sf.read(tmp_path / entry["audio"])
    b, _ = sf.read(root / first["audio"])
    assert np.array_equal(a, b)


def test_plan_jobs_balances_instruments():
    jobs = D.plan_jobs(40, 10.0, 0, ["a", "b", "c", "d"], val_fraction=0.1)
    assert sum(j.split == "validation" for j in jobs) == 4
    train = [j.instrument for j in jobs if j.split == "train"]
    assert {train.count(k) for k in "abcd"} <= {9, 8}
    assert len({j.id for j in jobs}) == 40


def test_cli(tmp_path, capsys):
    assert D.main_render(["--out", str(tmp_path), "--list-instruments"]) == 0
    assert "salamander" in capsys.readouterr().out
    if not FAST:
        pytest.skip("no fast renderer installed")
    rc = D.main_render(["--out", str(tmp_path / "o"), "--pieces", "1", "--seconds", "2",
                        "--seed", "3", "--instruments", FAST[0], "--workers", "1",
                        "--corpus-fraction", "0", "--no-augment"])
    assert rc == 0
    assert "wrote 1 clips" in capsys.readouterr().out
    assert (tmp_path / "o" / "train" / "train-000000.flac").is_file()
    assert D.main_render(["--out", str(tmp_path / "x"), "--instruments", "harpsichord",
                          "--pieces", "1"]) == 2


def test_held_out_pianos_stay_out_of_default_renders():
    """csound-gm is for validation only: a default render never uses it, naming it works."""
    from pianolm.export.data.render import INSTRUMENTS

    everything = dict.fromkeys(INSTRUMENTS)  # as if every renderer were installed
    chosen = D.default_instruments(everything)
    assert "csound-gm" not in chosen and INSTRUMENTS["csound-gm"].held_out
    assert set(chosen) == {k for k, s in INSTRUMENTS.items() if not s.held_out}
    assert "salamander" not in D.default_instruments({**everything, "salamander": "missing"})
