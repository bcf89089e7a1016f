"""`pianolm bench`: every preset x encoder x backend x mode x batch, one JSON report.

Order per preset and encoder: build the random-init systems (hierarchical, flattened) and make
sure their exports exist; analytic costs; then each backend in turn (torch first, then the torch
systems are freed and the ONNX Runtime sessions open): its encoder timed at `encoder_batches`,
then every mode, schedule and batch decoded from embeddings computed once, then a greedy decode
for the identity check. The JSON is rewritten after every backend, so a long run that is stopped
keeps what it measured.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pianolm.runtime import provenance
from pianolm.runtime.backend import Backend
from pianolm.runtime.provenance import git_info, package_versions

from . import analytic, identity
from .config import BenchConfig
from .drafts import AgreeingDraft
from .measure import measure, reset_peak_rss, stats, time_encoder
from .models import ModelKey, ModelStore, Opened, build_system, open_backend
from .summary import format_summary, summarize_report
from .workload import Row, Window, Workload

SCHEMA = "pianolm.bench/1"
# Backends that run the same encoder graph share its timing (int8 exports keep an fp32 encoder).
ENCODER_FAMILY = {"torch-cache": "torch", "torch-nocache": "torch", "ort-fp32": "ort-cpu",
                  "ort-int8": "ort-cpu", "ort-cuda": "ort-cuda", "tensorrt": "tensorrt"}
EMBED_CHUNK = 4  # segments per encoder call when computing the decodes' embeddings


def devset_folder(path: Path | None) -> Path:
    from pianolm.export.train.evaluate import devset_path

    return devset_path(path)


def machine() -> dict:
    """provenance.machine() and the GPU torch sees."""
    out = provenance.machine()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                      "count": torch.cuda.device_count(), "cuda": torch.version.cuda}
    return out


def versions() -> dict:
    return {**package_versions(("pianolm", "numpy", "onnxruntime", "onnxruntime-gpu", "torch",
                                "onnx", "matplotlib")),
            "torch_threads": torch.get_num_threads()}


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)


def _print(line: str) -> None:
    print(line, flush=True)


def _line(e: dict) -> str:
    stages = e.get("stages") or {}
    first = stages.get("onset") or stages.get("flat") or {}
    step = (first.get("step_ms") or {}).get("median")
    step_s = f", step {step:6.2f} ms" if step is not None else ""
    if e.get("agreement") is not None:
        step_s = (f", drafts {e['agreement']:.0%} exact, "
                  f"{e['decoder_calls']['calls_per_note']:.2f} calls/note")
    return (f"  {e['preset']:<5} {e['backend']:<13} {e['mode']:<12} {e['schedule']:<10} "
            f"batch {e['batch']:<3} decode {e['decode_ms']['median']:9.1f} ms{step_s}, "
            f"{e['notes_per_s']['median']:8.1f} notes/s, RTF {e['real_time_factor']['median']:.4f}")


def _schedules(cfg: BenchConfig, backend: str, mode: str, batch: int) -> list[str]:
    """What to run of `mode` at `batch`. The authors ran their stages one after another; the
    runtime may overlap velocity and offset. Outside the full batches only the throughput
    decode runs: hierarchical in the runtime's schedule (flat where the run has no
    hierarchical mode)."""
    if mode == "flat" or backend == "torch-nocache":
        schedules = ["sequential"]
    else:
        schedules = ["sequential", "concurrent"]
    if batch in cfg.full_batches:
        return schedules
    throughput = "hierarchical" if "hierarchical" in cfg.modes else "flat"
    if mode != throughput:
        return []
    return [cfg.runtime_schedule(backend)] if len(schedules) > 1 else schedules


@dataclass
class Embeddings:
    """Each window's embeddings, computed once per encoder (the decodes' input; their values do
    not change what a teacher-forced decode costs)."""

    cache: dict[tuple[str, Window], np.ndarray] = field(default_factory=dict)

    def get(self, encoder: str, rows: list[Row], backend: Backend) -> np.ndarray:
        missing = list(dict.fromkeys(r.window for r in rows
                                     if (encoder, r.window) not in self.cache))
        by_window = {r.window: r for r in rows}
        for i in range(0, len(missing), EMBED_CHUNK):
            chunk = missing[i:i + EMBED_CHUNK]
            emb = backend.encode(np.stack([by_window[w].audio for w in chunk]))
            for w, e in zip(chunk, emb):
                self.cache[encoder, w] = e
        return np.stack([self.cache[encoder, r.window] for r in rows])


@dataclass
class ModelRun:
    """The state of one preset x encoder while its backends are measured."""

    cfg: BenchConfig
    preset: str
    encoder: str
    workload: Workload
    embeddings: Embeddings
    report: dict
    log: Callable[[str], None]
    encoder_times: dict[str, dict[int, list[float]]] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return f"{self.preset}/{self.encoder}"

    def encoder_seconds(self, name: str, backend: Backend) -> dict[int, list[float]]:
        """Per-segment encoder seconds at each encoder batch, measured once per family."""
        family = ENCODER_FAMILY[name]
        if family not in self.encoder_times:
            cfg = self.cfg
            times = {b: time_encoder(backend, np.stack([r.audio for r in self.workload.rows(b)]),
                                     cfg.repeats, cfg.warmup)
                     for b in sorted(set(cfg.encoder_batches))}
            self.encoder_times[family] = times
            self.report["encoder"].setdefault(self.tag, {})[family] = {
                "measured_with": name,
                "ms_per_segment": {str(b): stats(t, 1e3) for b, t in times.items()}}
        return self.encoder_times[family]

    def _add(self, name: str, o: Opened, mode: str, schedule: str, batch: int, timed: int,
             fig: dict, repeats: int, warmup: int, agreement: float | None = None) -> None:
        entry = {"preset": self.preset, "encoder": self.encoder, "backend": name,
                 "precision": o.precision, "mode": mode, "schedule": schedule, "batch": batch,
                 "agreement": agreement, "repeats": repeats, "warmup": warmup,
                 "encoder_timed_at_batch": timed, **fig}
        self.report["results"].append(entry)
        self.log(_line(entry))

    def _speculative(self, name: str, o: Opened, rows: list[Row], batch: int, timed: int,
                     emb: np.ndarray, per_segment: float) -> None:
        """The hierarchical decode in the runtime's schedule, verifying drafts that agree with
        the forced notes at each rate (plain greedy beside it: the entry of agreement None)."""
        cfg = self.cfg
        schedule = cfg.runtime_schedule(name)
        for agreement in cfg.agreements:
            drafts = [AgreeingDraft.from_row(r, agreement, cfg.seed + i)
                      for i, r in enumerate(rows)]
            reset_peak_rss()
            fig = measure(o.backend, rows, "hierarchical", schedule == "concurrent",
                          cfg.repeats, cfg.warmup, cfg.bucket, with_steps=False,
                          embeddings=emb, encoder_s_per_segment=per_segment, drafts=drafts)
            self._add(name, o, "hierarchical", schedule, batch, timed, fig, cfg.repeats,
                      cfg.warmup, agreement)

    def measure_backend(self, name: str, opened: dict[str, Opened],
                        greedy: dict[str, dict]) -> None:
        cfg = self.cfg
        nocache = name == "torch-nocache"
        batches = cfg.nocache_batches if nocache else cfg.batches
        repeats, warmup = (cfg.nocache_repeats, 0) if nocache else (cfg.repeats, cfg.warmup)
        first = next(iter(opened.values())).backend
        enc = self.encoder_seconds(name, first)
        for mode, o in opened.items():
            for batch in batches:
                if not _schedules(cfg, name, mode, batch):
                    continue
                rows = self.workload.rows(batch)
                emb = self.embeddings.get(self.encoder, rows, o.backend)
                # the encoder's median per segment at the largest timed batch <= this one
                timed = max((b for b in enc if b <= batch), default=min(enc))
                per_segment = float(np.median(enc[timed]))
                for schedule in _schedules(self.cfg, name, mode, batch):
                    reset_peak_rss()  # the entry's own peak (the process's baseline included)
                    fig = measure(o.backend, rows, mode, schedule == "concurrent", repeats,
                                  warmup, cfg.bucket, with_steps=schedule == "sequential",
                                  embeddings=emb, encoder_s_per_segment=per_segment)
                    self._add(name, o, mode, schedule, batch, timed, fig, repeats, warmup)
                if mode == "hierarchical" and batch in cfg.full_batches \
                        and cfg.speculates(name):
                    self._speculative(name, o, rows, batch, timed, emb, per_segment)
            if name in identity.COMPARED + identity.REDUCED:
                row = self.workload.rows(1)[0]
                greedy.setdefault(mode, {})[name] = identity.greedy_tokens(
                    o.backend, row.audio, row.spec, cfg.identity_notes)
        peaks = [e["peak_rss_mb"] for e in self.report["results"]
                 if e["backend"] == name and e["preset"] == self.preset
                 and e["encoder"] == self.encoder]
        self.report["backends"][self.tag][name] = {
            "status": "ok", "precision": next(iter(opened.values())).precision,
            "open_s": {m: o.open_s for m, o in opened.items()}, "batches": list(batches),
            "repeats": repeats, "warmup": warmup, "peak_rss_mb": max(peaks, default=None)}


def run_bench(cfg: BenchConfig, *, build: Callable[[ModelKey], torch.nn.Module] = build_system,
              store: ModelStore | None = None, log: Callable[[str], None] = _print) -> dict:
    """Run the benchmark `cfg` describes; returns the report (also written to cfg.out_path)."""
    store = store or ModelStore(cfg.models_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_path = cfg.out_path
    workload = Workload.from_devset(devset_folder(cfg.devset), cfg.window_stride_s)
    log(f"workload: {workload.describe(cfg.target_notes)['note']}")
    report: dict = {
        "schema": SCHEMA,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "versions": versions(), "git": git_info(), "args": cfg.to_dict(),
        # the floor's method here; its measurements per model: analytic.<tag>.<precision>.floor
        "bandwidth": {"method": analytic.FLOOR_METHOD, "past": analytic.FLOOR_PAST, "chunk": 1,
                      "repeats": cfg.stream_repeats},
        "workload": workload.describe(cfg.target_notes), "models": {},
        "analytic": {}, "encoder": {}, "backends": {}, "identity": {}, "results": [],
        "summary": {},
        # velocity/offset schedule the runtime picks per backend here (throughput runs and the
        # headline ratios use it; batch 1 measures both)
        "schedules": {b: cfg.runtime_schedule(b) for b in cfg.ordered_backends()},
        # backends whose speculative sweep runs (entries with an agreement; README "Benchmark")
        "speculative": [b for b in cfg.ordered_backends() if cfg.speculates(b)],
        "peak_rss_scope": "per result entry: the process's peak RSS while that entry's runs "
                          "ran (reset before each entry; the process's baseline included)"}
    t_start = time.perf_counter()
    embeddings = Embeddings()
    for preset in cfg.presets:
        for encoder in cfg.encoders:
            run = ModelRun(cfg, preset, encoder, workload, embeddings, report, log)
            _bench_model(run, store, build, out_path)
    report["summary"] = summarize_report(report)
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    if cfg.plots:
        from .plots import write_plots

        report["plots"] = [p.name for p in write_plots(report, out_path)]
    write_json(report, out_path)
    log(format_summary(report["summary"]))
    log(f"wrote {out_path}" + (f" and {len(report['plots'])} plots" if cfg.plots else ""))
    return report


def _bench_model(run: ModelRun, store: ModelStore,
                 build: Callable[[ModelKey], torch.nn.Module], out_path: Path) -> None:
    cfg, report, tag = run.cfg, run.report, run.tag
    keys = {mode: ModelKey(run.preset, run.encoder, mode == "hierarchical", cfg.seed)
            for mode in cfg.modes}
    t0 = time.perf_counter()
    systems = {mode: build(key) for mode, key in keys.items()}
    system = next(iter(systems.values()))
    decoder_cfg = next(iter(system.decoder_configs.values()))
    frames = int(system.encoder.frames_per_segment)
    run.log(f"{tag}: systems built in {time.perf_counter() - t0:.1f} s")
    needed = {"int8" if b == "ort-int8" else "fp32" for b in cfg.backends
              if not b.startswith("torch")}
    for mode, key in keys.items():  # exports first, so torch can be freed before ORT runs
        for precision in sorted(needed):
            store.folder(key, precision, systems[mode])
    report["models"][tag] = {
        "decoder": decoder_cfg.to_dict(), "frames_per_segment": frames,
        "decoder_params_per_stage": sum(p.numel() for p in
                                        next(iter(system.decoders.values())).parameters()),
        "encoder_params": sum(p.numel() for p in system.encoder.parameters()),
        "exports_built_s": dict(store.built)}
    report["analytic"][tag] = analytic.describe(decoder_cfg, frames, cfg.stream_repeats,
                                                cfg.threads)
    for precision in ("fp32", "int8"):
        floor = report["analytic"][tag][precision]["floor"]
        run.log(f"{tag}: {precision} floor {floor['floor_ms']:.3f} ms: read-only stream of "
                f"{floor['bytes'] / 1e6:.1f} MB (weights + K/V of a 1-token step at past "
                f"{floor['past']}, {frames} frames) at {floor['stream']['gb_per_s']} GB/s "
                f"(median of {cfg.stream_repeats})")
    del system
    report["backends"][tag] = {}
    greedy: dict[str, dict] = {}  # mode -> backend -> greedy tokens
    for name in cfg.ordered_backends():
        if not name.startswith("torch") and systems:
            systems.clear()  # the torch side is done: free its memory before ORT opens
            gc.collect()
        opened = {mode: open_backend(name, key, store, systems.get(mode), cfg.threads,
                                     cfg.torch_device)
                  for mode, key in keys.items()}
        skipped = next((o.skipped for o in opened.values() if o.skipped), None)
        if skipped:
            report["backends"][tag][name] = {"status": "skipped", "reason": skipped}
            run.log(f"{tag}: {name} skipped: {skipped}")
            continue
        reset_peak_rss()
        run.measure_backend(name, opened, greedy)
        del opened
        gc.collect()
        write_json(report, out_path)
    result = {mode: {**identity.compare_tokens(tokens, cfg.identity_notes),
                     "precision_cost": identity.precision_cost(tokens)}
              for mode, tokens in greedy.items()}
    verdicts = [v["identical"] for v in result.values()]
    result["identical"] = None if None in verdicts or not verdicts else all(verdicts)
    report["identity"][tag] = result
    run.log(f"{tag}: greedy decode identical across {', '.join(identity.COMPARED)} "
            f"({cfg.identity_notes} notes max): {result['identical']}")
