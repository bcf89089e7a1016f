"""The benchmarked models: random-init systems per preset, their exports cached on disk, and
every backend by name.

Decoder weights are `sharpen`ed (export/decoder.py): O(1) logits, so the greedy identity check
compares real decisions. Cost does not depend on the values. A system is rebuilt from its seed
in every run (deterministic); its ONNX exports (fp32, and int8 derived from it) are cached under
`--models-dir` (default work/bench-models/, git-ignored) and rebuilt when the fingerprint (the
key, torch and the model source files) changes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pianolm.export.decoder import sharpen
from pianolm.export.system import SystemConfig, TranscriptionSystem
from pianolm.runtime.backend import Backend, BackendUnavailable

_EXPORT = Path(__file__).resolve().parents[1]
_SOURCES = ("decoder.py", "system.py", "onnx_export.py", "precision.py", "encoders.py", "crnn.py",
            "hppnet.py", "rnn_weights.py", "frontend.py")
STAMP = "bench-model.json"


@dataclass(frozen=True)
class ModelKey:
    preset: str
    encoder: str
    hierarchical: bool
    seed: int = 0

    @property
    def name(self) -> str:
        kind = "hier" if self.hierarchical else "flat"
        return f"{self.preset}-{self.encoder}-{kind}-s{self.seed}"

    @property
    def mode(self) -> str:
        return "hierarchical" if self.hierarchical else "flat"


def build_system(key: ModelKey) -> TranscriptionSystem:
    """The random-init system of `key`, decoders sharpened; the same weights every time."""
    torch.manual_seed(key.seed)
    system = TranscriptionSystem(SystemConfig(encoder=key.encoder, decoder=key.preset,
                                              hierarchical=key.hierarchical))
    for i, decoder in enumerate(system.decoders.values()):
        sharpen(decoder, seed=key.seed * 10 + i + (0 if key.hierarchical else 5))
    return system.eval()


def fingerprint(key: ModelKey) -> str:
    h = hashlib.sha256(json.dumps(asdict(key), sort_keys=True).encode())
    h.update(torch.__version__.encode())
    for name in _SOURCES:
        path = _EXPORT / name
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


class ModelStore:
    """Exported folders per (key, precision) under `root`, built on first use."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.built: dict[str, float] = {}  # folder name -> seconds spent building it this run

    def folder(self, key: ModelKey, precision: str, system: TranscriptionSystem | None = None
               ) -> Path:
        """The export of `key` at `precision` ("fp32" or "int8"); `system` saves a rebuild."""
        from pianolm.export.onnx_export import export_model
        from pianolm.export.precision import convert_model

        out = self.root / key.name / precision
        stamp = {"key": asdict(key), "precision": precision, "fingerprint": fingerprint(key)}
        if (out / STAMP).is_file() and json.loads((out / STAMP).read_text()) == stamp:
            return out
        if out.exists():
            shutil.rmtree(out)
        t0 = time.perf_counter()
        if precision == "fp32":
            export_model(system if system is not None else build_system(key), out,
                         seed=key.seed, metadata={"preset": key.preset, "bench": True})
        else:
            convert_model(self.folder(key, "fp32", system), out, precision)
        (out / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
        self.built[f"{key.name}/{precision}"] = round(time.perf_counter() - t0, 1)
        return out


@dataclass
class Opened:
    """A backend by name, or why it could not be opened here."""

    name: str
    backend: Backend | None
    precision: str
    skipped: str | None = None
    open_s: float = 0.0


def _tensorrt(folder: Path) -> Backend:
    from pianolm.runtime.trt_backend import TensorRTBackend
    from pianolm.runtime.trt_build import BUILD_RECORD, TensorRTUnavailable, build_engines

    engines = folder.parent / f"{folder.name}-trt"
    try:
        if not (engines / BUILD_RECORD).is_file():
            build_engines(folder, out_dir=engines)
        return TensorRTBackend(folder, engines_dir=engines)
    except TensorRTUnavailable as e:
        raise BackendUnavailable(str(e)) from None


def open_backend(name: str, key: ModelKey, store: ModelStore,
                 system: TranscriptionSystem | None, threads: int | None,
                 torch_device: str = "cpu") -> Opened:
    """Open backend `name` for `key`; machine-dependent failures become a skip with a reason.
    The torch backends run on `torch_device` (the system moves there)."""
    t0 = time.perf_counter()
    precision = "int8" if name == "ort-int8" else "fp32"
    try:
        backend: Any
        if name in ("torch-cache", "torch-nocache"):
            from pianolm.export.torch_backend import TorchBackend

            assert system is not None, "torch backends need the system"
            backend = TorchBackend(system.to(torch_device), use_cache=name == "torch-cache")
        elif name in ("ort-fp32", "ort-int8"):
            from pianolm.runtime.ort_backend import OrtBackend

            backend = OrtBackend(store.folder(key, precision, system), threads=threads)
        elif name == "ort-cuda":
            from pianolm.runtime.ort_iobinding import OrtIoBindingBackend

            backend = OrtIoBindingBackend(store.folder(key, "fp32", system), device="cuda",
                                          threads=threads)
        elif name == "tensorrt":
            backend = _tensorrt(store.folder(key, "fp32", system))
        else:
            raise ValueError(f"unknown backend {name!r}")
    except (BackendUnavailable, ImportError) as e:
        return Opened(name, None, precision, skipped=str(e).splitlines()[0] or repr(e))
    except Exception as e:  # a GPU stack that loads but fails: record it, go on with the rest
        if name in ("ort-cuda", "tensorrt"):
            return Opened(name, None, precision, skipped=f"{type(e).__name__}: {e}"[:500])
        raise
    return Opened(name, backend, precision, open_s=round(time.perf_counter() - t0, 2))
