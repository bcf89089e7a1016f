"""`pianolm bench` (export/bench/): behaviour, never timings.

- the codec-built workload: teacher-forced sequences have the codec's lengths for known notes;
- forcing through the runtime's decode loop returns exactly the codec's tokens;
- the analytic FLOP / byte count matches a hand count; the floor is the step's bytes over a
  read-only stream's rate measured over that many bytes; old (copy floor) reports still read;
- `--quick` runs end to end on the tiny models the export tests share (tests/tiny_model.py: the
  real encoders' exports take minutes) with a small dev-set slice, and writes the JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pianolm.runtime import vocab as V
from pianolm.runtime.notes import Note
from tests.fake_backend import FakeBackend

torch = pytest.importorskip("torch")

from pianolm.export.bench import analytic  # noqa: E402
from pianolm.export.bench.config import QUICK, parse_config  # noqa: E402
from pianolm.export.bench.identity import greedy_tokens  # noqa: E402
from pianolm.export.bench.measure import run_once  # noqa: E402
from pianolm.export.bench.models import ModelStore  # noqa: E402
from pianolm.export.bench.workload import (  # noqa: E402
    Clip,
    Window,
    Workload,
    clean_notes,
    row_counts,
)
from pianolm.export.decoder import Decoder, DecoderConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

# A window starting at 20 s: one note carried in (begun at 18 s), four own notes (one of them
# sounding past the window's end), one after the window, one long before it (ended).
KNOWN = [
    Note(5.0, 6.0, 60, 50),  # ended before the window
    Note(18.0, 21.5, 48, 70),  # carried: sounds at 20 s
    Note(20.5, 21.0, 60, 64),
    Note(20.5, 22.0, 64, 64),
    Note(25.0, 26.0, 67, 90),
    Note(29.0, 31.0, 72, 30),  # own, sounds past 30 s: off = note_sustain
    Note(30.5, 31.0, 74, 60),  # after the window
]


def _known_workload() -> Workload:
    clip = Clip("known", KNOWN, None)
    return Workload([clip], [Window("known", 20.0, 4, 1)])


def test_teacher_forced_sequences_have_the_codecs_lengths():
    row = _known_workload().row(Window("known", 20.0, 4, 1))
    n, c = 4, 1
    assert row.own_notes == n and len(row.segment.carried) == c
    tokens = {s: len(t) for s, t in row.tokens.items()}
    targets = {s: len(t) for s, t in row.targets.items()}
    assert tokens == {"onset": 2 + 2 * n + 1, "velocity": 2 + 3 * n, "offset": 2 + 3 * (n + c),
                      "flat": 2 + 4 * (n + c) + 1}
    # predicted: onset every token after the prompt (2 per note, eos), velocity / offset one
    # per note, flat 4 per note and eos
    assert targets == {"onset": 2 * n + 1, "velocity": n, "offset": n + c,
                       "flat": 4 * (n + c) + 1}
    assert row.targets["onset"][:2] == [V.time_token(50), V.pitch_token(60)]
    assert row.targets["onset"][-1] == V.EOS
    assert row.targets["velocity"] == [V.velocity_token(v) for v in (64, 64, 90, 30)]
    # own offsets (ticks in the window), the sustaining note, then the carried note's off
    assert row.targets["offset"] == [V.time_token(100), V.time_token(200), V.time_token(600),
                                     V.NOTE_SUSTAIN, V.time_token(150)]
    assert row.spec.carry_in[0].pitch == 48 and row.spec.segment == 1
    counts = row_counts([row], "hierarchical")
    # onset 2n+1 calls; velocity / offset a prompt plus one chunk per note
    assert counts["calls"] == (2 * n + 1) + (n + 1) + (n + c + 1)
    assert counts["critical_path_calls"] == (2 * n + 1) + (n + c + 1)
    assert row_counts([row], "flat")["calls"] == 4 * (n + c) + 1


def test_clean_notes_keeps_the_grammar():
    from pianolm.runtime.tokens import TickNote

    notes = [TickNote(10, 50, 60), TickNote(10, 40, 60), TickNote(30, 80, 60),
             TickNote(10, 20, 62)]
    assert clean_notes(notes) == [TickNote(10, 30, 60), TickNote(10, 20, 62),
                                  TickNote(30, 80, 60)]


@pytest.mark.parametrize("mode", ["hierarchical", "flat"])
@pytest.mark.parametrize("droppable", [False, True])
def test_forced_decode_returns_the_codecs_tokens(mode, droppable):
    """Rows of different lengths, through runtime/decode.py with a stand-in backend whose own
    choices are pseudo-random: run_once checks the tokens against the codec's and raises."""
    clip = Clip("known", KNOWN, None)
    windows = [Window("known", s, 0, 0) for s in (20.0, 17.0, 24.0)]
    work = Workload([clip], windows)
    rows = work.rows(3)
    assert len({r.own_notes for r in rows}) > 1
    stages = ("onset", "velocity", "offset") if mode == "hierarchical" else ("flat",)
    backend = FakeBackend(stages, droppable=droppable)
    run = run_once(backend, rows, mode, concurrent=True)
    assert run.first_onset_s is not None and run.decode_s >= run.first_onset_s
    for stage in stages:
        times = run.timings.stages[stage]
        assert len(times.prefill) == 1
        calls = max(len(r.targets[stage]) for r in rows) + (stage in ("velocity", "offset"))
        assert 1 + len(times.steps) == calls


def test_precision_cost_scores_reduced_precision_notes_against_fp32():
    from pianolm.export.bench.identity import precision_cost
    from pianolm.runtime.decode import RowSpec

    rng = np.random.default_rng(0)
    audio = [(0.1 * rng.normal(size=160000)).astype(np.float32) for _ in range(2)]
    tokens = [greedy_tokens(FakeBackend(), a, RowSpec(0), max_notes=12) for a in audio]
    assert precision_cost({"ort-fp32": tokens[0]}) == {}  # nothing to score
    same = precision_cost({"ort-fp32": tokens[0], "ort-int8": tokens[0]})["ort-int8"]
    assert same["same_tokens"] and same["onset_offset_velocity_f"] == 1.0
    assert same["n_pred"] == same["n_ref"] > 0
    other = precision_cost({"ort-fp32": tokens[0], "ort-int8": tokens[1]})["ort-int8"]
    assert not other["same_tokens"] and other["onset_f"] < 1.0


def test_analytic_counts_match_a_hand_count():
    cfg = DecoderConfig(n_layers=1, d_model=4, n_heads=2, enc_dim=3, vocab_size=10)
    assert cfg.mlp_hidden == 256  # ceil(8*4/3) = 11, rounded up to 256
    p = analytic.step_params(cfg)
    # self-attention 4 d^2 = 64; cross q, o 2 d^2 = 32; two SwiGLUs 2 * 3 * 4 * 256 = 6144;
    # head 4 * 10 = 40; norms (4 + 1) * 4 = 20
    assert (p.self_attention, p.cross_attention, p.mlp, p.head, p.norms) == (64, 32, 6144, 40,
                                                                            20)
    cost = analytic.step_cost(cfg, chunk=1, past=3, frames=5)
    # matmuls 2 * (64 + 32 + 6144) + head 2 * 40 = 12560; self-attention 4 * 1 * (3+1) * 4 = 64;
    # cross-attention 4 * 1 * 5 * 4 = 80
    assert cost.flops == 12560 + 64 + 80
    # weights (6240 + 40 + 20) * 4 bytes + one embedding row 4 * 4
    assert cost.weight_bytes == 6300 * 4 + 16
    # K and V: self (3 + 1) positions and cross 5 frames, d = 4, fp32
    assert cost.kv_bytes == 2 * (4 + 5) * 4 * 4
    # batch 2, chunk 3: matmuls scale with rows x tokens, the head with rows only
    cost = analytic.step_cost(cfg, chunk=3, past=3, frames=5, batch=2)
    assert cost.flops == 2 * 2 * 3 * 6240 + 2 * 2 * 40 + 2 * 4 * 3 * 6 * 4 + 2 * 4 * 3 * 5 * 4
    # the count is the decoder's own: every parameter a step reads (not the token table, the
    # audio projections or the cross-attention K/V projections, which the cross-KV graph holds)
    decoder = Decoder(cfg)
    read = sum(t.numel() for name, t in decoder.named_parameters()
               if not name.startswith(("tok_emb", "audio_")) and ".cross.wk" not in name
               and ".cross.wv" not in name)
    assert read == p.total


def test_stream_bandwidth_reads_the_bytes_given_at_a_positive_rate():
    nbytes = 3 * 2**20 + 5  # not whole rows: rounded up to the next 4 KB row
    bw = analytic.stream_bandwidth(nbytes, repeats=3)
    row = 4 * analytic.STREAM_COLUMNS
    assert nbytes <= bw["bytes"] < nbytes + row and bw["bytes"] % row == 0
    assert math.isfinite(bw["bytes_per_s"]) and bw["bytes_per_s"] > 0
    assert 0 < bw["min_gb_per_s"] <= bw["gb_per_s"] <= bw["max_gb_per_s"]
    assert bw["repeats"] == 3


def test_floor_is_the_steps_bytes_over_the_stream_rate_measured_over_them():
    cfg = DecoderConfig(n_layers=2, d_model=256, n_heads=4, enc_dim=3, vocab_size=100)
    frames = 40
    out = analytic.describe(cfg, frames, repeats=2)
    assert out["floor_method"] == analytic.FLOOR_METHOD and "bandwidth_gb_per_s" not in out
    for precision in ("fp32", "int8"):
        floor = out[precision]["floor"]
        cost = analytic.step_cost(cfg, chunk=1, past=analytic.FLOOR_PAST, frames=frames,
                                  precision=precision)
        assert floor["method"] == analytic.FLOOR_METHOD
        assert (floor["chunk"], floor["past"], floor["frames"]) == (1, analytic.FLOOR_PAST,
                                                                   frames)
        assert (floor["weight_bytes"], floor["kv_bytes"], floor["bytes"]) == (
            cost.weight_bytes, cost.kv_bytes, cost.bytes)
        assert out[precision]["weight_bytes"] == cost.weight_bytes
        # streamed over the step's own byte count, not a fixed buffer
        assert cost.bytes <= floor["stream"]["bytes"] < cost.bytes + 4 * analytic.STREAM_COLUMNS
        rate = floor["stream"]["bytes_per_s"]
        assert math.isfinite(rate) and rate > 0
        assert out[precision]["floor_ms"] == floor["floor_ms"]
        assert floor["floor_ms"] == pytest.approx(cost.bytes / rate * 1e3, rel=1e-3, abs=1e-4)
    assert out["int8"]["floor"]["bytes"] < out["fp32"]["floor"]["bytes"]


@pytest.mark.parametrize("name", ["bench_cpu_small_hppnet.json", "bench_cpu_base_hppnet.json"])
def test_copy_floor_reports_still_summarize_and_plot(name, tmp_path):
    """The committed reports predate the read-only stream: their floor (a copy's rate) is read
    back as what it was, and their plots still draw."""
    from pianolm.export.bench.summary import COPY_FLOOR, format_summary, summarize_report

    report = json.loads((RESULTS / name).read_text())
    summary = summarize_report(report)
    floors = [k for k in summary if k.startswith("step_vs_floor")]
    assert floors
    for key in floors:
        assert summary[key]["floor_method"] == COPY_FLOOR
        assert summary[key]["floor_ms"] == report["summary"][key]["floor_ms"]
        assert summary[key]["measured"] == report["summary"][key]["measured"]
    assert "step_vs_floor" in format_summary(summary)
    pytest.importorskip("matplotlib")
    from pianolm.export.bench.plots import write_plots

    paths = write_plots(report, tmp_path / name)
    assert len(paths) == 3 and all(p.stat().st_size > 0 for p in paths)


def test_quick_options_and_explicit_wins():
    cfg = parse_config(["--quick"])
    assert cfg.presets == QUICK["presets"] and cfg.batches == QUICK["batches"]
    assert cfg.repeats == QUICK["repeats"]
    assert parse_config(["--quick", "--batches", "2"]).batches == (2,)
    with pytest.raises(SystemExit):
        parse_config(["--repeats", "0"])
    assert parse_config(["--stream-repeats", "3"]).stream_repeats == 3
    with pytest.raises(SystemExit):
        parse_config(["--stream-repeats", "0"])


def test_cli_passes_bench_through(capsys):
    from pianolm.runtime.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# End to end


class FixtureStore(ModelStore):
    """The session's tiny exports (tests/tiny_model.py) in place of the bench's own."""

    def __init__(self, exported, root: Path) -> None:
        super().__init__(root)
        self.exported = exported

    def folder(self, key, precision, system=None):  # noqa: ANN001, ANN201
        if key.hierarchical:
            return (self.exported.dirs["hier"] if precision == "fp32"
                    else self.exported.precision(precision))
        if precision == "fp32":
            return self.exported.dirs["flat"]
        out = self.root / f"flat-{precision}"
        if not out.exists():
            from pianolm.export.precision import convert_model

            convert_model(self.exported.dirs["flat"], out, precision)
        return out


def _devset_slice(folder: Path) -> Path:
    """Two short clips of notes, no audio (the encoder then reads noise)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, count in (("a", 14), ("b", 9)):
        onsets = np.sort(rng.uniform(0, 9.5, count))
        lines = ["onset_s\toffset_s\tpitch\tvelocity"]
        for t in onsets:
            lines.append(f"{t:.3f}\t{t + rng.uniform(0.1, 2.0):.3f}\t{rng.integers(40, 90)}"
                         f"\t{rng.integers(20, 120)}")
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def summary_f1(report: dict) -> dict:
    return report["summary"]["int8_vs_fp32_step"]["f1_vs_fp32"]


def test_quick_run_end_to_end(exported, tmp_path):
    from pianolm.export.bench.runner import run_bench
    from pianolm.export.bench.summary import TARGETS

    out = tmp_path / "results" / "quick.json"
    argv = ["--quick", "--devset", str(_devset_slice(tmp_path / "devset")), "--out", str(out),
            "--identity-notes", "8", "--threads", "1"]
    try:
        import matplotlib  # noqa: F401

        plots = True
    except ModuleNotFoundError:  # plots are the `bench` extra's; the rest runs without
        plots = False
    cfg = replace(parse_config(argv + ["--plots"] if plots else argv), stream_repeats=2)
    lines: list[str] = []
    run_bench(cfg, build=lambda key: exported.hier if key.hierarchical else exported.flat,
              store=FixtureStore(exported, tmp_path / "models"), log=lines.append)
    report = json.loads(out.read_text())
    for key in ("machine", "versions", "git", "args", "bandwidth", "workload", "analytic",
                "encoder", "backends", "identity", "results", "summary"):
        assert key in report, key
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    assert {"numpy", "onnxruntime", "torch"} <= set(report["versions"])
    tag = "tiny/hppnet"
    backends = report["backends"][tag]
    for name in ("torch-cache", "torch-nocache", "ort-fp32", "ort-int8"):
        assert backends[name]["status"] == "ok", name
    for name in ("ort-cuda", "tensorrt"):  # skipped here, with the reason; run where present
        assert backends[name]["status"] == "ok" or backends[name]["reason"]
    assert report["identity"][tag]["identical"] is True
    cost = report["identity"][tag]["hierarchical"]["precision_cost"]["ort-int8"]
    assert 0 <= cost["onset_f"] <= 1 and cost["against"] == "ort-fp32"
    assert summary_f1(report) == {k: cost[k] for k in ("onset_f", "onset_offset_f",
                                                       "onset_offset_velocity_f")}
    got = {(r["backend"], r["mode"], r["schedule"], r["batch"]) for r in report["results"]}
    # batch 4 runs only the throughput decode, in the schedule the runtime picks here
    assert report["schedules"]["ort-fp32"] == cfg.runtime_schedule("ort-fp32")
    assert ("ort-fp32", "hierarchical", cfg.runtime_schedule("ort-fp32"), 4) in got
    assert {("ort-fp32", "hierarchical", s, 1) for s in ("sequential", "concurrent")} <= got
    assert ("ort-int8", "flat", "sequential", 1) in got
    assert ("torch-nocache", "hierarchical", "sequential", 1) in got
    assert ("torch-nocache", "hierarchical", "sequential", 4) not in got  # --nocache-batches 1
    entry = next(r for r in report["results"] if r["backend"] == "ort-fp32"
                 and r["schedule"] == "sequential" and r["mode"] == "hierarchical")
    assert entry["counts"]["notes"] == report["workload"]["densest"]["notes"]
    assert set(entry["stages"]) == {"onset", "velocity", "offset"}
    onset = entry["stages"]["onset"]
    assert onset["step_ms"]["n"] == QUICK["repeats"]
    steps = onset["steps_per_run"] * QUICK["repeats"]
    assert sum(b["n"] for b in onset["step_by_past_ms"]) == steps
    for fig in ("wall_ms", "decode_ms", "encoder_ms_per_segment", "time_to_first_onset_ms",
                "tokens_per_s", "notes_per_s", "real_time_factor"):
        assert set(entry[fig]) == {"median", "min", "max", "n"}, fig
    assert entry["peak_rss_mb"] > 0
    assert report["analytic"][tag]["fp32"]["floor_ms"] > 0
    assert report["bandwidth"]["method"] == analytic.FLOOR_METHOD
    assert report["bandwidth"]["repeats"] == 2
    for precision in ("fp32", "int8"):
        floor = report["analytic"][tag][precision]["floor"]
        assert floor["stream"]["repeats"] == 2
    summary = report["summary"]
    assert len(summary) == len(TARGETS)
    for e in summary.values():
        assert {"target", "measured", "pass", "preset"} <= set(e)
        assert e["measured"] is not None, e
    assert summary["step_vs_floor_tiny"]["floor_method"] == analytic.FLOOR_METHOD
    # the speculative sweep: every backend but the authors' decode, batch 1, the runtime's
    # schedule, each agreement (forced tokens checked as in every run)
    ran = [b for b in report["speculative"] if backends[b]["status"] == "ok"]
    assert ran[:3] == ["torch-cache", "ort-fp32", "ort-int8"]
    spec = {(r["backend"], r["agreement"]) for r in report["results"]
            if r["agreement"] is not None}
    assert spec == {(b, a) for b in ran for a in cfg.agreements}
    sweep = summary["speculative_vs_greedy"]["sweep"]
    assert [s["agreement"] for s in sweep] == sorted(cfg.agreements)
    exact = sweep[-1]
    assert exact["calls_per_note"] < exact["plain_calls_per_note"]
    if plots:
        assert len(report["plots"]) == 4
        for name in report["plots"]:
            assert (out.parent / name).stat().st_size > 0
