"""music21 corpus: held-out solo-piano pieces never reach training; humanised clips are sane."""

from __future__ import annotations

import pytest

from pianolm.export.data import corpus as C
from pianolm.export.data.common import max_density

if not C.music21_available():
    print("skip: music21 is not installed (scripts/install_renderers.sh installs it)")
    pytest.skip("music21 is not installed", allow_module_level=True)

MUST_HOLD_OUT = ("joplin/", "schumann_clara/", "beach/", "mozart/k545/", "cpebach/",
                 "schoenberg/", "bach/bwv66.6.")


def test_held_out_pieces_are_excluded_from_training():
    train, val, held = (C.list_pieces(s) for s in ("train", "validation", "heldout"))
    assert len(train) > 1000 and len(val) > 20
    for prefix in MUST_HOLD_OUT:
        assert not any(p.startswith(prefix) for p in train + val), prefix
        assert any(p.startswith(prefix) for p in held), prefix
    assert not set(train) & set(val)
    assert "bach/bwv66.6.mxl" in held and "bach/bwv66.7.mxl" not in held
    # Mozart's other pieces (quartets) are still used
    assert any(p.startswith("mozart/k") and not p.startswith("mozart/k545") for p in train)
    with pytest.raises(ValueError, match="held out"):
        C.corpus_piece("joplin/maple_leaf_rag.mxl", seed=0)
    with pytest.raises(ValueError):
        C.corpus_clip(10.0, 0, split="heldout")


def test_split_is_stable():
    assert C.split_of("bach/bwv1.6.mxl") == C.split_of("bach/bwv1.6.mxl")
    assert C.split_of("cpebach/h186.mxl") == "heldout"


def test_humanised_chorale(tmp_path, monkeypatch):
    monkeypatch.setenv("PIANOLM_CACHE", str(tmp_path))
    path = "bach/bwv1.6.mxl"
    score = C.load_score(path)
    assert len(score.notes) > 100 and score.bars and score.n_parts >= 4
    assert any(tmp_path.rglob("*.json"))  # cached
    a, b = C.humanise(score, seed=1), C.humanise(score, seed=2)
    for piece in (a, b):
        assert piece.source == f"corpus:{path}"
        assert all(21 <= n.pitch <= 108 and 1 <= n.velocity <= 127 for n in piece.notes)
        assert all(n.offset > n.onset >= 0 for n in piece.notes)
        assert max_density(piece.notes) < 40
    assert a.notes != b.notes  # different performances
    on_a = sorted(n.onset for n in a.notes)
    assert 10 < on_a[-1] < 200  # a chorale lasts tens of seconds
    # onsets are not on a mechanical grid: chord members are spread a little
    spreads = [abs(x - y) for x, y in zip(on_a, on_a[1:], strict=False) if abs(x - y) < 0.03]
    assert any(s > 0.001 for s in spreads)
    again = C.load_score(path)  # from the cache
    assert again.notes == score.notes
