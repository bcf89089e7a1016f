"""PNG plots of a bench report (matplotlib: `pip install 'pianolm[bench]'`, never a runtime need).

- `<stem>_step_vs_past.png`: onset-stage step latency vs past length, per backend, batch 1, with
  the fp32 bandwidth floor (a read-only stream of the step's bytes; a copy's rate in older
  reports);
- `<stem>_throughput_vs_batch.png`: notes/s vs batch, per backend (hierarchical, in the
  runtime's velocity/offset schedule);
- `<stem>_hier_vs_flat.png`: decode time of the same notes, hierarchical (sequential and
  concurrent) vs flattened, per backend, batch 1;
- `<stem>_speedup_vs_agreement.png`: speculative over plain greedy decode time vs how many
  draft notes are exact, per backend, batch 1 (runs with the speculative sweep).
One panel per preset (first encoder of the run).
"""

from __future__ import annotations

from pathlib import Path

from .summary import COPY_FLOOR, floor_of, runtime_schedule, speculative_sweep

COLORS = {"torch-nocache": "tab:red", "torch-cache": "tab:orange", "ort-fp32": "tab:blue",
          "ort-int8": "tab:green", "ort-cuda": "tab:purple", "tensorrt": "tab:brown"}


def _panels(plt, presets: list[str]):  # noqa: ANN001, ANN202
    fig, axes = plt.subplots(1, len(presets), figsize=(5.5 * len(presets), 4.2), squeeze=False)
    return fig, dict(zip(presets, axes[0]))


def _entries(report: dict, **want: object) -> list[dict]:
    """The first encoder's entries with every `want` (plain greedy decodes unless `agreement`
    is given, as summary.find)."""
    encoder = report["args"]["encoders"][0]
    want.setdefault("agreement", None)
    return [r for r in report["results"] if r["encoder"] == encoder
            and all(r.get(k) == v for k, v in want.items())]


def step_vs_past(report: dict, plt, presets: list[str]) -> object:  # noqa: ANN001
    fig, axes = _panels(plt, presets)
    encoder = report["args"]["encoders"][0]
    for preset, ax in axes.items():
        for r in _entries(report, preset=preset, mode="hierarchical", schedule="sequential",
                          batch=1):
            buckets = r["stages"]["onset"]["step_by_past_ms"]
            x = [(b["past_lo"] + b["past_hi"]) / 2 for b in buckets]
            ax.plot(x, [b["median"] for b in buckets], marker=".", label=r["backend"],
                    color=COLORS.get(r["backend"]))
        floor, method = floor_of(report["analytic"].get(f"{preset}/{encoder}", {}))
        if floor:
            how = "copy bandwidth" if method == COPY_FLOOR else "read-only stream"
            ax.axhline(floor, color="gray", linestyle="--", label=f"fp32 floor ({how})")
        ax.set(title=f"{preset}: onset step, batch 1", xlabel="past length (positions)",
               ylabel="ms per step (median)", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def throughput_vs_batch(report: dict, plt, presets: list[str]) -> object:  # noqa: ANN001
    from matplotlib.ticker import NullLocator

    fig, axes = _panels(plt, presets)
    for preset, ax in axes.items():
        series: dict[str, list[tuple[int, float]]] = {}
        for r in _entries(report, preset=preset, mode="hierarchical"):
            if r["schedule"] == runtime_schedule(report, r["backend"]) or (
                    r["backend"] == "torch-nocache"):
                series.setdefault(r["backend"], []).append((r["batch"],
                                                            r["notes_per_s"]["median"]))
        for backend, points in series.items():
            points.sort()
            ax.plot(*zip(*points), marker="o", label=backend, color=COLORS.get(backend))
        ax.set(title=f"{preset}: hierarchical decode", xlabel="batch (segments)",
               ylabel="notes/s (median)", xscale="log", yscale="log")
        batches = sorted({b for points in series.values() for b, _ in points})
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def hier_vs_flat(report: dict, plt, presets: list[str]) -> object:  # noqa: ANN001
    fig, axes = _panels(plt, presets)
    kinds = (("hierarchical", "sequential", "hierarchical, sequential"),
             ("hierarchical", "concurrent", "hierarchical, vel+off concurrent"),
             ("flat", "sequential", "flattened"))
    for preset, ax in axes.items():
        backends = [b for b in COLORS if _entries(report, preset=preset, backend=b, batch=1)]
        width = 0.8 / len(kinds)
        for k, (mode, schedule, label) in enumerate(kinds):
            heights = []
            for b in backends:
                e = _entries(report, preset=preset, backend=b, batch=1, mode=mode,
                             schedule=schedule)
                heights.append(e[0]["decode_ms"]["median"] / 1e3 if e else 0.0)
            ax.bar([i + k * width for i in range(len(backends))], heights, width, label=label)
        ax.set_xticks([i + width for i in range(len(backends))], backends, rotation=20,
                      fontsize=8)
        ax.set(title=f"{preset}: same notes, batch 1", ylabel="decode time (s, median)",
               yscale="log")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    return fig


def speedup_vs_agreement(report: dict, plt, presets: list[str]) -> object:  # noqa: ANN001
    fig, axes = _panels(plt, presets)
    encoder = report["args"]["encoders"][0]
    results = [r for r in report["results"] if r["encoder"] == encoder]
    ctx = {"schedules": report.get("schedules", {})}
    for preset, ax in axes.items():
        for backend in COLORS:
            sweep = [s for s in speculative_sweep(results, preset, backend, ctx) if s["speedup"]]
            if sweep:
                ax.plot([100 * s["agreement"] for s in sweep], [s["speedup"] for s in sweep],
                        marker="o", label=backend, color=COLORS[backend])
        ax.axhline(1.0, color="gray", linestyle="--", label="plain greedy")
        ax.set(title=f"{preset}: speculative decode, batch 1",
               xlabel="draft notes exact (%)", ylabel="speedup over plain greedy (x)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def write_plots(report: dict, json_path: Path) -> list[Path]:
    """Write the PNGs beside `json_path` (the speculative one where the run measured a
    sweep); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(report["args"]["presets"])
    out = []
    for name, make in (("step_vs_past", step_vs_past), ("throughput_vs_batch",
                                                         throughput_vs_batch),
                       ("hier_vs_flat", hier_vs_flat),
                       ("speedup_vs_agreement", speedup_vs_agreement)):
        if make is speedup_vs_agreement and not any(r.get("agreement") is not None
                                                    for r in report["results"]):
            continue
        fig = make(report, plt, presets)
        fig.tight_layout()
        path = json_path.with_name(f"{json_path.stem}_{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    """Re-draw the plots of a written report: python -m pianolm.export.bench.plots REPORT.json"""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("report", type=Path)
    args = ap.parse_args(argv)
    for path in write_plots(json.loads(args.report.read_text()), args.report):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
