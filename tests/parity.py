"""Runtime vs PyTorch reference: the same files, the same notes.

The reference is the PyTorch system with a KV cache (export/torch_backend.py), one file at a
time, batch 1, stages one after another. The runtime is the exported folder on ONNX Runtime,
driven by Transcriber with several files in one stream, at the batch sizes given, with the
velocity and offset stages running concurrently.
"""

from __future__ import annotations

from pathlib import Path


def devset_audio(devset: Path, names: list[str] | None = None) -> list[Path]:
    """Dev-set audio files (wav and flac), optionally only the named clips."""
    files = sorted(p for p in devset.glob("dev_*") if p.suffix in (".wav", ".flac"))
    return [p for p in files if names is None or p.stem in names]


def assert_runtime_matches_torch(system, folder: Path, files: list[Path], batches=(1, 8),
                                 max_notes: int = 48) -> int:
    """Returns the number of notes compared (so callers can insist it is not zero)."""
    from pianolm.export.torch_backend import TorchBackend
    from pianolm.runtime.transcriber import Transcriber

    torch_ref = Transcriber(backend=TorchBackend(system), batch=1, max_notes=max_notes,
                            concurrent=False)
    reference = [torch_ref.transcribe(f).notes for f in files]
    for batch in batches:
        runtime = Transcriber(folder, backend="cpu", batch=batch, max_notes=max_notes)
        together = [r.notes for r in runtime.transcribe_many(files)]
        assert together == reference, f"several files at batch {batch}"
        assert runtime.transcribe(files[0]).notes == reference[0], f"one file at batch {batch}"
    return sum(len(n) for n in reference)
