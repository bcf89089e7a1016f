"""Where a figure was measured: the machine, the installed versions and the commit.

Every benchmark's JSON starts with `provenance(...)`, so results in benchmarks/results/ can be
compared (README "Benchmarks"). Torch-free; the torch-side benchmarks add their GPU.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
RUNTIME_DISTS = ("pianolm", "numpy", "onnxruntime", "onnxruntime-gpu")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """CPU, cores, platform, Python, memory and the load average when the run started."""
    out = {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
           "python": platform.python_version()}
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            out["memory_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    with contextlib.suppress(OSError):
        out["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return out


def package_version(dist: str) -> str | None:
    """A distribution's installed version, None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions(dists: Sequence[str]) -> dict[str, str]:
    """{dist: version} of those of `dists` that are installed."""
    return {d: v for d in dists if (v := package_version(d)) is not None}


def git_info() -> dict | None:
    """The checkout's commit and whether tracked files differ from it; None outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(_REPO), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(dists: Sequence[str] = RUNTIME_DISTS) -> dict:
    """The header of a benchmark's JSON: its command line, machine, versions and commit."""
    return {"command": " ".join(["python", *sys.argv]), "machine": machine(),
            "versions": package_versions(dists), "git": git_info()}


def write_report(path: str | Path, benchmark: str, result: dict,
                 dists: Sequence[str] = RUNTIME_DISTS) -> None:
    """A benchmark's JSON in benchmarks/results/: its name, `provenance(dists)`, the result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": benchmark, **provenance(dists), "result": result}
    path.write_text(json.dumps(report, indent=1) + "\n")
