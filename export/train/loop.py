"""The training-loop skeleton shared by the encoder (encoder.py) and LM (lm.py) trainers.

    cfg, saved, out = open_run(EncoderTrainConfig, out_dir, resume, given, ...)
    run = Run(cfg, out, model, optimizer, rng, best_key="best_f", best=-1.0)
    run.start(saved, quiet)                         # resume: weights, optimizer, RNG, step, best
    while run.step < run.stop_at: ...               # the trainer's own loop, top to bottom
        run.set_lr(); ...; run.step += 1; meter.add(loss=...)
        if run.log_due(): run.log.write("train", run.step, **meter.means()); meter.reset()
        if run.every(cfg.val_every) and run.validated(scores, "onset_f"): save best weights
        if run.every(cfg.save_every): run.save_state(); save latest weights

`open_run` turns a call's arguments into the run's config (on --resume the saved config, with
explicitly given values on top). `Run` is what a loop carries from step to step: the step, the
best validation metric so far, the last validation scores and the JSONL log; it writes and
restores state.pt (common.py: file names, log format). `Meter` sums per-step training values
between two "train" log lines. The loops themselves, and what they validate and which weight
files they write, stay in their trainers.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .common import (
    STATE_FILE,
    JsonlLog,
    atomic_torch_save,
    config_from,
    load_state,
    lr_at,
    restore_rng,
    rng_state,
    set_lr,
    set_threads,
)


def open_run(cls: type, out_dir: str | Path, resume: bool, given: Mapping[str, Any],
             required: Sequence[str], missing: str) -> tuple[Any, dict[str, Any] | None, Path]:
    """(config, saved state.pt or None, run folder) for a trainer call; makes the folder.

    `given`: the call's config fields, None for "not given". On resume the saved config is the
    base, else `cls`'s defaults, and a new run needs every field in `required` (else ValueError
    `missing`). `until_step` holds for this call only: it is never taken from the saved run.
    """
    out = Path(out_dir)
    saved = load_state(out) if resume else None
    if resume and saved is None:
        print(f"{out}: nothing to resume, starting a new run", file=sys.stderr)
    given = {k: v for k, v in given.items() if v is not None}
    given["out_dir"] = str(out)
    if saved is None and not all(given.get(k) for k in required):
        raise ValueError(missing)
    cfg = config_from(cls, saved["config"] if saved else {}, given)
    if "until_step" not in given:  # a stop point belongs to one invocation, not to the run
        cfg = replace(cfg, until_step=None)
    set_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    return cfg, saved, out


@dataclass
class Run:
    """One run's loop state: step, best validation metric, last validation scores, the log.

    `cfg`: the trainer's config (steps, until_step, lr, warmup_steps, min_lr_ratio, log_every).
    `best_key` names the best metric in state.pt; `best` starts at its worst value.
    """

    cfg: Any
    out: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    rng: np.random.Generator
    best_key: str
    best: float
    lower_is_better: bool = False
    step: int = 0
    last_val: dict[str, float] = field(default_factory=dict)
    log: JsonlLog = field(init=False)

    def start(self, saved: Mapping[str, Any] | None, quiet: bool = False) -> None:
        """A resumed run (`saved`: its state.pt) continues exactly: weights, optimizer, RNG
        states, step, best metric and last scores come back, and its log drops lines past the
        step. A new run starts a fresh log."""
        if saved is not None:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            restore_rng(saved["rng"], self.rng)
            self.step = int(saved["step"])
            self.best = float(saved.get(self.best_key, self.best))
            self.last_val = dict(saved.get("last_val", {}))
        self.log = JsonlLog(self.out, resume_step=self.step if saved is not None else None,
                            quiet=quiet)

    @property
    def stop_at(self) -> int:
        """The step this call stops at: the run's end, or an earlier `until_step`."""
        cfg = self.cfg
        return min(cfg.steps, cfg.until_step) if cfg.until_step is not None else cfg.steps

    @property
    def finished(self) -> bool:
        return self.step >= self.cfg.steps

    def set_lr(self) -> float:
        """Set and return this step's learning rate (warmup + cosine, common.lr_at)."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
        set_lr(self.optimizer, lr)
        return lr

    def every(self, interval: int) -> bool:
        """Whether the step just done is a multiple of `interval` (0: never)."""
        return bool(interval) and self.step % interval == 0

    def log_due(self) -> bool:
        """A "train" log line every `log_every` steps and at this call's last step."""
        return self.step % self.cfg.log_every == 0 or self.step == self.stop_at

    def final_validation_due(self, val_every: int) -> bool:
        """A finished run ends with scores for its last step (unless it just validated)."""
        return self.finished and bool(val_every) and self.step % val_every != 0

    def validated(self, scores: dict[str, float], metric: str) -> bool:
        """Record validation `scores` (last scores, a "val" log line); True when `metric` is
        the best so far (the caller then saves its best weights)."""
        self.last_val = scores
        self.log.write("val", self.step, **scores)
        value = scores[metric]
        if (value < self.best) if self.lower_is_better else (value > self.best):
            self.best = value
            return True
        return False

    def save_state(self, **extra: Any) -> None:
        """state.pt: everything needed to continue exactly (`extra`: e.g. a sampler's state)."""
        atomic_torch_save({"step": self.step, "model": self.model.state_dict(),
                           "optimizer": self.optimizer.state_dict(), "rng": rng_state(self.rng),
                           **extra, "config": asdict(self.cfg), self.best_key: self.best,
                           "last_val": self.last_val}, self.out / STATE_FILE)

    def summary(self, **extra: Any) -> dict[str, Any]:
        """What a trainer returns (and `pianolm train` prints)."""
        return {"step": self.step, "finished": self.finished, "out_dir": str(self.out), **extra}


class Meter:
    """Per-step training values summed since the last "train" log line, and their time."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.tokens = 0
        self.t0 = time.perf_counter()

    def add(self, tokens: int = 0, **values: float) -> None:
        """One step's values (and, for an LM, the tokens it read)."""
        self.steps += 1
        self.tokens += tokens
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def means(self) -> dict[str, float]:
        return {k: v / self.steps for k, v in self.sums.items()}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0
