"""`pianolm import`: a peer's published checkpoint -> a pianolm model folder (docs/import.md).

    pianolm import kong CRNN_note_F1=0.9677_pedal_F1=0.9186.pth --out engines/kong

kong: Kong et al.'s piano_transcription_inference checkpoint (Zenodo 4034264), note and pedal
models. The folder is rolls-only (no LM stages were trained on these weights): its encoder
graph outputs the note and pedal rolls, its notes and pedals come from Kong's own
post-processor (runtime/kong_rolls.py) over Kong's own segmenting, so `pianolm transcribe`
gives what Kong's tool gives, with pianolm's backends, batching, server and corpus.

The weights are converted from the file the user gives and never redistributed: the Zenodo
record states no licence (docs/import.md).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pianolm.runtime.manifest import MANIFEST_FILE, RollsSpec, SourceSpec, file_sha256
from pianolm.runtime.rolls import RollDecodeConfig

log = logging.getLogger(__name__)

# Kong's tool's thresholds (piano_transcription_inference 0.0.6, inference.py), his post-processor
KONG_ROLLS = RollsSpec(RollDecodeConfig(method="kong", onset_threshold=0.3, offset_threshold=0.3,
                                        frame_threshold=0.1, pedal_offset_threshold=0.2,
                                        pedal_frame_threshold=0.5),
                       tuned=True, thresholds_from="Kong et al.'s piano_transcription_inference "
                                                   "0.0.6 (its own thresholds for this model)")


class ImportFailed(ValueError):
    """A checkpoint that cannot be imported, or an output folder that must not be touched."""


def _fresh_folder(out: Path, overwrite: bool) -> None:
    """Nothing a user has is overwritten unless they say so."""
    if out.exists() and not out.is_dir():
        raise ImportFailed(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ImportFailed(f"{out}: folder exists and is not empty (pass --overwrite to "
                               "replace the model in it)")
        if not (out / MANIFEST_FILE).is_file():
            raise ImportFailed(f"{out}: not a pianolm model folder (no {MANIFEST_FILE}); "
                               "--overwrite replaces model folders only")
        shutil.rmtree(out)


def import_kong(checkpoint: str | Path, out: str | Path, precision: str = "fp32",
                overwrite: bool = False):
    """Kong's Zenodo-layout checkpoint -> a rolls-only model folder; returns its manifest."""
    from pianolm.export.kong import KongImportError, load_kong_checkpoint
    from pianolm.export.onnx_export import export_rolls_model

    out = Path(out)
    _fresh_folder(out, overwrite)
    try:
        encoder, info = load_kong_checkpoint(checkpoint)
    except KongImportError as e:
        raise ImportFailed(str(e)) from None
    source = SourceSpec(checkpoint=str(checkpoint), sha256=file_sha256(checkpoint),
                        metadata={"importer": "kong",
                                  "origin": "Kong et al. 2021, High-resolution piano "
                                            "transcription with pedals (note and pedal models)",
                                  **info})
    return export_rolls_model(encoder, "kong-crnn", out, KONG_ROLLS, source, precision,
                              segmenting="kong")


def main_import(argv: Sequence[str] | None = None) -> int:
    """`pianolm import`: see the module docstring."""
    ap = argparse.ArgumentParser(prog="pianolm import", description="Convert a peer's "
                                 "checkpoint into a pianolm model folder (docs/import.md).")
    sub = ap.add_subparsers(dest="kind", required=True)
    kong = sub.add_parser("kong", help="Kong et al.'s CRNN note + pedal checkpoint (Zenodo "
                          "4034264, piano_transcription_inference)")
    kong.add_argument("checkpoint", help="the .pth file, e.g. "
                      "CRNN_note_F1=0.9677_pedal_F1=0.9186.pth")
    kong.add_argument("--out", required=True, help="the model folder to write")
    kong.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                      help="int8: the encoder's MatMuls 8-bit (ONNX Runtime dynamic "
                           "quantization); the convolutions stay fp32 (docs/import.md)")
    kong.add_argument("--overwrite", action="store_true",
                      help="replace a model folder that exists")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    t0 = time.perf_counter()
    try:
        if not Path(args.checkpoint).is_file():
            raise ImportFailed(f"{args.checkpoint}: no such file")
        manifest = import_kong(args.checkpoint, args.out, args.precision, args.overwrite)
    except (ImportFailed, OSError, ValueError) as e:
        print(f"pianolm import: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({manifest.precision}, rolls-only: notes and pedals by Kong's "
          f"post-processor) in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_import())
