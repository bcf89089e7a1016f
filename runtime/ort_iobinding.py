"""ONNX Runtime with IO binding: the decoder's caches stay on the device between steps.

`OrtIoBindingBackend(model_dir, device="cuda")` is `OrtBackend` (same loading and checks against
the manifest, same step bookkeeping) whose sessions bind their inputs and outputs: cross K/V and
past/present K/V are OrtValues on the device, each step's present becomes the next step's past
without leaving it, and only tokens, positions and key_mask go up and the logits come down.
Plain `InferenceSession.run` copies the whole cache to the host and back every step, which made
ONNX Runtime on CUDA slower than PyTorch in other projects (docs/model.md, "Export traps").

device="cpu" runs the same code on the CPU: that is how it is tested without a GPU, and it saves
the numpy copies of the cache there too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .backend import BackendUnavailable, check_embeddings
from .manifest import DecoderSpec
from .ort_backend import OrtBackend
from .step_session import StepSession, empty_past

DEVICES = ("cuda", "cpu")
CUDA_HINT = ("install onnxruntime-gpu: pip install 'pianolm[gpu]'; if the CPU onnxruntime is "
             "installed too (both provide the onnxruntime module): pip uninstall -y onnxruntime "
             "&& pip install --force-reinstall --no-deps onnxruntime-gpu")


def to_device(array: np.ndarray, device: str, device_id: int) -> Any:
    """A numpy array as an OrtValue on the device."""
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, device_id)


@dataclass
class DeviceKVCache:
    """One session's attention state as OrtValues on `device`: what the step graph reads."""

    past: list[Any]  # ort.OrtValue per layer K, V [B, H, P, Dh] (decoder.past_names order)
    cross: list[Any]  # per layer K^T [B, H, Dh, T], V [B, H, T, Dh]; fixed for the segment
    device: str
    device_id: int

    @property
    def batch(self) -> int:
        return int(self.cross[0].shape()[0])

    def select(self, rows: np.ndarray) -> DeviceKVCache:
        """Through the host: keep() runs a few times per stage, steps run hundreds of times."""
        def cut(values: list[Any]) -> list[Any]:
            return [to_device(v.numpy()[rows], self.device, self.device_id) for v in values]

        return DeviceKVCache(cut(self.past), cut(self.cross), self.device, self.device_id)


class IoBindingStageSession(StepSession):
    """StepSession whose step graph runs with IO binding over a DeviceKVCache."""

    cache: DeviceKVCache

    def __init__(self, session: Any, decoder: DecoderSpec, cache: DeviceKVCache) -> None:
        super().__init__(session, decoder, cache)
        self.binding = session.io_binding()

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        c, b, d = self.cache, self.binding, self.decoder
        for name, array in feeds.items():
            b.bind_cpu_input(name, np.ascontiguousarray(array))  # copied up by ORT
        for name, value in zip(d.past_names + d.cross_names, c.past + c.cross):
            b.bind_ortvalue_input(name, value)
        # Rebinding each output every step makes ORT allocate it afresh: the previous present
        # (now the past input) is never written over, and its length may change.
        b.bind_output("logits", "cpu", 0)
        for name in d.present_names:
            b.bind_output(name, c.device, c.device_id)
        self.session.run_with_iobinding(b)
        logits, *c.past = b.get_outputs()  # in the order first bound
        return logits.numpy()


class OrtIoBindingBackend(OrtBackend):
    """OrtBackend with IO binding on `device` ("cuda": CUDAExecutionProvider on GPU `device_id`;
    "cpu": the CPU provider)."""

    def __init__(self, model_dir: str | Path, device: str = "cuda", device_id: int = 0,
                 threads: int | None = None) -> None:
        if device not in DEVICES:
            raise ValueError(f"device must be one of {list(DEVICES)}, got {device!r}")
        providers: list[Any] = ["CPUExecutionProvider"]
        if device == "cuda":
            available = ort.get_available_providers()
            if "CUDAExecutionProvider" not in available:
                raise BackendUnavailable(f"device='cuda' needs ONNX Runtime's "
                                         f"CUDAExecutionProvider; this onnxruntime "
                                         f"{ort.__version__} has {available}: {CUDA_HINT}")
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        super().__init__(model_dir, providers, threads)
        self.device = device
        self.device_id = device_id
        if device == "cuda":
            # ORT falls back to the CPU, with a log line, when the CUDA libraries fail to load
            for name, session in self.sessions.items():
                if "CUDAExecutionProvider" not in session.get_providers():
                    raise BackendUnavailable(
                        f"ONNX Runtime could not put graph {name} on CUDA device {device_id} "
                        f"(providers in use: {session.get_providers()}); see its log for the "
                        f"missing CUDA / cuDNN library, or {CUDA_HINT}")

    def start(self, stage: str, embeddings: np.ndarray) -> IoBindingStageSession:
        spec, emb = check_embeddings(self.manifest, stage, embeddings)
        cross = self.sessions[f"{stage}.cross_kv"]
        binding = cross.io_binding()
        binding.bind_cpu_input("embeddings", np.ascontiguousarray(emb))
        for name in spec.decoder.cross_names:
            binding.bind_output(name, self.device, self.device_id)
        cross.run_with_iobinding(binding)
        past = [to_device(p, self.device, self.device_id)
                for p in empty_past(spec.step, spec.decoder, len(emb))]
        return IoBindingStageSession(self.sessions[f"{stage}.step"], spec, DeviceKVCache(
            past, list(binding.get_outputs()), self.device, self.device_id))
