"""The encoder of a pianolm model folder, as an encoder module.

`pianolm import authors --encoder pianolm=DIR` puts the authors' stage decoders over an encoder
that exists only as an exported graph (e.g. engines/default). `FolderEncoder` gives that graph
the encoder interface (export/encoders.py) by running it with ONNX Runtime, so the system can
be built, checked and exported like any other; export_model copies the graph file rather than
tracing it, and keeps the folder's roll thresholds, input peak and encoder description.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pianolm.runtime.manifest import EncoderSpec, ManifestError, load_manifest

from .frontend import EncoderOutput


class FolderEncoder(nn.Module):
    """A model folder's fp32 encoder graph: waveform [B, samples] -> EncoderOutput."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        manifest = load_manifest(folder)
        if manifest.precision != "fp32":
            raise ManifestError(f"{folder}: its graphs are {manifest.precision}; an encoder "
                                "taken from a folder must be fp32 (the import converts it to "
                                "--precision itself)")
        if manifest.segmenting != "pianolm" or manifest.encoder.parts:
            raise ManifestError(f"{folder}: its encoder is not one plain encoder over pianolm's "
                                "segments")
        self.manifest = manifest
        self.spec = manifest.encoder
        self.embed_dim = self.spec.embed_dim
        self.frames_per_second = self.spec.frames_per_second
        self.frames_per_segment = self.spec.frames_per_segment
        self.input_peak = manifest.input_peak
        self.roll_keys = self.spec.rolls.outputs if self.spec.rolls else ()
        self._session = None  # opened on first use

    def forward(self, waveform: torch.Tensor) -> EncoderOutput:
        import onnxruntime as ort

        if self._session is None:
            self._session = ort.InferenceSession(str(self.manifest.path(self.spec.graph)),
                                                 providers=["CPUExecutionProvider"])
        names = ["embeddings", *self.roll_keys]
        outputs = self._session.run(names, {"waveform": waveform.detach().cpu().numpy()
                                            .astype(np.float32)})
        found = dict(zip(names, (torch.from_numpy(o) for o in outputs)))
        return EncoderOutput(rolls={k: found[k] for k in self.roll_keys},
                             embedding=found["embeddings"])

    def embed(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.forward(waveform).embedding

    def copy_into(self, out: Path) -> EncoderSpec:
        """Copy the graph (and its external data) into `out`; returns its manifest section."""
        graph = self.spec.graph
        for name in (graph.file, graph.external_data):
            if name:
                shutil.copyfile(self.manifest.folder / name, out / name)
        return replace(self.spec, config={**self.spec.config,
                                          "copied_from": str(self.manifest.folder)})
