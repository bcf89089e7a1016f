"""`pianolm corpus` on a real local Ray (runtime/corpus.py): nested folders plus two bad files.
Outputs mirror the layout with the MIDI `pianolm transcribe` writes for each file; results.parquet
has one row per input; bad files fail alone; a re-run skips everything; deleting one output and
re-running redoes just that one; --retry runs the failed ones again. Skipped, saying why, where
Ray is not installed or cannot start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.struck_tones import struck_tones
from tests.tables import close_tables

ray = pytest.importorskip("ray", reason="pianolm corpus needs the scale extra (ray[data])")
pq = pytest.importorskip("pyarrow.parquet")

from pianolm.runtime.cli import main  # noqa: E402
from pianolm.runtime.corpus import (  # noqa: E402
    CorpusConfig,
    corpus_model_sha256,
    expand_braces,
    list_inputs,
    run_corpus,
    start_ray,
)

RATE = 16000


@pytest.fixture(scope="module")
def local_ray():
    try:
        start_ray(None)
    except Exception as e:  # a machine where Ray cannot start: say so, check the rest
        pytest.skip(f"Ray could not start here: {type(e).__name__}: {e}")
    yield
    ray.shutdown()


@pytest.fixture()
def corpus(tmp_path) -> Path:
    root = tmp_path / "in"
    (root / "x" / "y").mkdir(parents=True)
    sf.write(root / "x" / "c1.wav", struck_tones(3.0, 1), RATE, subtype="PCM_16")
    sf.write(root / "x" / "y" / "c2.flac", struck_tones(12.5, 2), RATE)
    sf.write(root / "c3.wav", struck_tones(6.0, 3), 44100 // 2)  # another rate
    (root / "bad.wav").write_text("not audio\n")
    nan = struck_tones(2.0, 4)
    nan[100] = np.nan
    sf.write(root / "x" / "nan.wav", nan, RATE, subtype="FLOAT")
    (root / "notes.txt").write_text("not matched by the glob\n")
    return root


GOOD = ["c3.wav", "x/c1.wav", "x/y/c2.flac"]
BAD = ["bad.wav", "x/nan.wav"]


def test_list_inputs_globs_braces_and_lists(corpus, tmp_path):
    assert expand_braces("**/*.{wav,flac}") == ["**/*.wav", "**/*.flac"]
    root, rels = list_inputs(str(corpus))
    assert root == corpus and rels == sorted(GOOD + BAD)
    listing = corpus / "list.txt"
    listing.write_text("x/c1.wav\n\nc3.wav\n")
    assert list_inputs(str(listing)) == (corpus, ["c3.wav", "x/c1.wav"])


def test_corpus_end_to_end_and_resumable(local_ray, corpus, tmp_path):
    out = tmp_path / "out"
    config = CorpusConfig(out_dir=str(out), batch=4, threads=1)
    first = run_corpus(str(corpus), config, actors=1)
    assert (first.ok, first.failed, first.skipped) == (3, 2, 0)

    # the layout mirrored, each MIDI byte for byte what `pianolm transcribe` writes
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.mid")) == sorted(
        Path(g).with_suffix(".mid").as_posix() for g in GOOD)
    for rel in GOOD:
        cli = tmp_path / "cli" / Path(rel).with_suffix(".mid")
        assert main(["transcribe", str(corpus / rel), "-o", str(cli)]) in (0, None)
        assert (out / Path(rel).with_suffix(".mid")).read_bytes() == cli.read_bytes(), rel

    rows = {r["path"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}
    assert sorted(rows) == sorted(GOOD + BAD)
    sha = corpus_model_sha256(None)
    assert all(r["model_sha256"] == sha and r["actor"] for r in rows.values())
    assert all(rows[g]["status"] == "ok" and rows[g]["notes"] > 0 and rows[g]["error"] == ""
               for g in GOOD)
    assert rows["x/y/c2.flac"]["audio_s"] == pytest.approx(12.5, abs=0.01)
    assert "not recognised" in rows["bad.wav"]["error"] and "NaN" in rows["x/nan.wav"]["error"]
    assert all(rows[b]["status"] == "failed" and rows[b]["error"].startswith(b) and
               "\n" not in rows[b]["error"] for b in BAD)
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp"))

    # a second run does nothing; a deleted output is redone alone
    again = run_corpus(str(corpus), config, actors=1)
    assert (again.ok, again.failed, again.skipped, again.failed_before) == (0, 0, 5, 2)
    kept = {g: (out / Path(g).with_suffix(".mid")).stat().st_mtime_ns for g in GOOD}
    (out / "x" / "c1.mid").unlink()
    redo = run_corpus(str(corpus), config, actors=1)
    assert (redo.ok, redo.failed, redo.skipped) == (1, 0, 4)
    assert (out / "x" / "c1.mid").is_file()
    for g in ("c3.wav", "x/y/c2.flac"):
        assert (out / Path(g).with_suffix(".mid")).stat().st_mtime_ns == kept[g]
    retried = run_corpus(str(corpus), config, actors=1, retry=True)
    assert (retried.ok, retried.failed, retried.skipped) == (0, 2, 3)

    # the CLI: exit 1 while some inputs stay failed, 2 for a usage error
    assert main(["corpus", str(corpus), "-o", str(out)]) == 1
    assert main(["corpus", str(tmp_path / "nowhere"), "-o", str(out)]) == 2
    os.remove(corpus / "bad.wav")
    os.remove(corpus / "x" / "nan.wav")
    assert main(["corpus", str(corpus), "-o", str(tmp_path / "clean")]) == 0


def test_a_ray_too_small_for_the_actors_is_one_line(local_ray, corpus, tmp_path, capsys):
    """Every actor holds its CPUs while it waits for audio: a setting that leaves no room for a
    read task would wait forever, so it is refused before anything runs."""
    cpus = int(ray.cluster_resources()["CPU"])
    code = main(["corpus", str(corpus), "-o", str(tmp_path / "out"), "--actors", str(cpus)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "need" in err and "--actors" in err, err


def test_more_actors_than_cores_run_oversubscribed(corpus, tmp_path):
    """The local Ray the command starts is sized to what was asked (actors x threads + a read
    task), so --actors equal to the machine's cores still transcribes (it used to hang)."""
    for rel in BAD:
        os.remove(corpus / rel)
    cmd = [sys.executable, "-m", "pianolm.runtime.cli", "corpus", str(corpus), "-o",
           str(tmp_path / "out"), "--actors", str(os.cpu_count() or 1)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL, env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "out").rglob("*.mid"))) == len(GOOD)


def test_an_imported_kong_model_writes_what_transcribe_writes(local_ray, corpus, kong_model,
                                                             tmp_path):
    """A rolls-only model (`pianolm import kong`) through the corpus: the notes table and the
    MIDI (its CC64 included) are those `pianolm transcribe` writes (batch rounding aside:
    tests/tables.py)."""
    from pianolm.runtime.midi import read_midi_with_pedal
    model = str(kong_model[1])
    out = tmp_path / "out"
    result = run_corpus(str(corpus), CorpusConfig(out_dir=str(out), model=model, batch=4,
                                                  threads=1, notes="tsv"), actors=1)
    assert (result.ok, result.failed) == (3, 2)
    for rel in GOOD:
        cli = tmp_path / "cli" / Path(rel).with_suffix(".mid")
        assert main(["transcribe", str(corpus / rel), "-o", str(cli), "--model", model,
                     "--notes", "tsv"]) in (0, None)
        mine = out / Path(rel).with_suffix(".mid")
        tables = (p.with_suffix(".tsv").read_text() for p in (mine, cli))
        assert close_tables(*tables)
        notes, pedals = read_midi_with_pedal(mine)
        assert (len(notes), len(pedals)) == tuple(map(len, read_midi_with_pedal(cli)))
