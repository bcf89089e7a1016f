"""Shared training plumbing: LR schedule, resumable state, JSONL logs, graceful stop.

A run folder holds `state.pt` (everything needed to continue exactly: model, optimizer, step,
RNG states, the run's config, sampler state) and `log.jsonl` (one JSON object per line:
`{"kind": "train" | "val" | "devset" | ..., "step": N, ...}`). `--resume` reloads state.pt and
drops log lines past its step (they are re-done and re-logged), so the log reads as one run.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"
LOG_FILE = "log.jsonl"


def lr_at(step: int, base_lr: float, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to base_lr * min_ratio at `total`.
    A function of the step alone, so a resumed run follows the same schedule."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at `lr`, times the group's own "lr_scale" where it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": rng.bit_generator.state,
            "python": random.getstate()}


def restore_rng(state: Mapping[str, Any], rng: np.random.Generator) -> None:
    torch.set_rng_state(state["torch"])
    rng.bit_generator.state = state["numpy"]
    random.setstate(state["python"])


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_state(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(out_dir) / STATE_FILE
    if not path.is_file():
        return None
    # our own file: optimizer state and numpy RNG state are not plain tensors
    return torch.load(path, map_location="cpu", weights_only=False)


def config_from(cls: type, saved: Mapping[str, Any], overrides: Mapping[str, Any]) -> Any:
    """A config dataclass from a saved dict, with explicitly given values on top."""
    known = {f.name for f in fields(cls)}
    merged = {k: v for k, v in saved.items() if k in known}
    merged.update({k: v for k, v in overrides.items() if k in known})
    for f in fields(cls):  # JSON/torch.save turn tuples into lists
        if isinstance(merged.get(f.name), list) and "tuple" in str(f.type):
            merged[f.name] = tuple(merged[f.name])
    return cls(**merged)


class JsonlLog:
    """Append-only JSONL log that also prints a one-line summary to stdout."""

    def __init__(self, out_dir: Path, resume_step: int | None = None, quiet: bool = False):
        self.path = out_dir / LOG_FILE
        self.quiet = quiet
        if resume_step is not None and self.path.is_file():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
                except ValueError:
                    continue
            atomic_write_text(self.path, "".join(s + "\n" for s in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run in an old folder starts a fresh log

    def write(self, kind: str, step: int, **values: Any) -> None:
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")
        if not self.quiet:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in values.items()
                             if isinstance(v, int | float) and not isinstance(v, bool))
            print(f"[{kind}] step {step} {shown}", flush=True)


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v)}")


class StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes its step, saves, and returns."""

    def __init__(self) -> None:
        self.stop = False


@contextmanager
def graceful_stop() -> Iterator[StopFlag]:
    flag = StopFlag()
    if not _main_thread():
        yield flag
        return

    def handler(signum, _frame):
        if flag.stop:  # second signal: give up at once
            raise KeyboardInterrupt
        flag.stop = True
        print(f"signal {signum}: stopping after this step (again to abort)", file=sys.stderr,
              flush=True)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))
