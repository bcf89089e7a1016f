"""`pianolm import`: a peer's published checkpoint -> a pianolm model folder (docs/import.md).

    pianolm import kong CRNN_note_F1=0.9677_pedal_F1=0.9186.pth --out engines/kong
    pianolm import authors --onset ON.pth --velocity VEL.pth --offset OFF.pth \
        --encoder kong=CRNN_note_F1=0.9677_pedal_F1=0.9186.pth --heads 16 --out engines/llm

kong: Kong et al.'s piano_transcription_inference checkpoint (Zenodo 4034264), note and pedal
models. The folder is rolls-only (no LM stages were trained on these weights): its encoder
graph outputs the note and pedal rolls, its notes and pedals come from Kong's own
post-processor (runtime/kong_rolls.py) over Kong's own segmenting, so `pianolm transcribe`
gives what Kong's tool gives, with pianolm's backends, batching, server and corpus.

authors: the stage decoders the paper's authors' training code saves (`EncDecPos` state dicts,
LiDCC/Improving-piano-transcription-by-LLM-based-decoder), converted exactly (export/authors.py),
over Kong's CRNN as the encoder (their CRNN systems' encoder): a folder with LM stages, which
`pianolm transcribe --decoder lm` decodes.

The weights are converted from the files the user gives and never redistributed: the Zenodo
record states no licence, and the authors' repository none at all (docs/import.md).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pianolm.runtime.manifest import (
    MANIFEST_FILE,
    Manifest,
    RollsSpec,
    SourceSpec,
    file_sha256,
    load_manifest,
)
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


def _check_out(out: Path, overwrite: bool) -> None:
    """Nothing a user has is overwritten unless they say so, and then only a model folder."""
    if out.exists() and not out.is_dir():
        raise ImportFailed(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ImportFailed(f"{out}: folder exists and is not empty (pass --overwrite to "
                               "replace the model in it)")
        if not (out / MANIFEST_FILE).is_file():
            raise ImportFailed(f"{out}: not a pianolm model folder (no {MANIFEST_FILE}); "
                               "--overwrite replaces model folders only")


def _write_folder(out: Path, export: Callable[[Path], Manifest]) -> Manifest:
    """Export into a fresh folder beside `out`, then put it in `out`'s place: a failed import
    leaves the model that was there as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-import-"))
    try:
        export(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_manifest(out)


def import_kong(checkpoint: str | Path, out: str | Path, precision: str = "fp32",
                overwrite: bool = False) -> Manifest:
    """Kong's Zenodo-layout checkpoint -> a rolls-only model folder; returns its manifest."""
    from pianolm.export.kong import KongImportError, load_kong_checkpoint
    from pianolm.export.onnx_export import export_rolls_model

    out = Path(out)
    _check_out(out, overwrite)
    try:
        encoder, info = load_kong_checkpoint(checkpoint)
    except KongImportError as e:
        raise ImportFailed(str(e)) from None
    source = SourceSpec(checkpoint=str(checkpoint), sha256=file_sha256(checkpoint),
                        metadata={"importer": "kong",
                                  "origin": "Kong et al. 2021, High-resolution piano "
                                            "transcription with pedals (note and pedal models)",
                                  **info})
    return _write_folder(out, lambda tmp: export_rolls_model(
        encoder, "kong-crnn", tmp, KONG_ROLLS, source, precision, segmenting="kong"))


# --encoder KIND=PATH: what each kind is read as
ENCODER_KINDS = {"kong": "Kong's Zenodo-layout file", "crnn": "the authors' fine-tuned CRNN "
                 "(Note_pedal.state_dict(), step=N_encoder.pth)"}


def import_authors(stages: dict[str, str | Path], encoder: str, heads: int, out: str | Path,
                   precision: str = "fp32", overwrite: bool = False,
                   trust_pickle: bool = False) -> Manifest:
    """The authors' three stage decoders over one encoder -> an LM model folder; returns its
    manifest. `encoder` is KIND=PATH (ENCODER_KINDS)."""
    from pianolm.export.authors import AuthorsImportError, convert_decoder, load_stage_checkpoint
    from pianolm.export.kong import KongImportError, load_kong_checkpoint
    from pianolm.export.onnx_export import export_model
    from pianolm.export.system import SystemConfig, TranscriptionSystem

    kind, _, path = encoder.partition("=")
    if kind not in ENCODER_KINDS or not path:
        raise ImportFailed(f"--encoder {encoder!r}: expected KIND=PATH with KIND one of "
                           f"{', '.join(ENCODER_KINDS)}")
    out = Path(out)
    _check_out(out, overwrite)
    try:
        kong, _ = load_kong_checkpoint(path)
        converted = {stage: convert_decoder(load_stage_checkpoint(file, trust_pickle), heads,
                                            "crnn", source=str(file))
                     for stage, file in stages.items()}
    except (KongImportError, AuthorsImportError) as e:
        raise ImportFailed(str(e)) from None
    system = TranscriptionSystem(SystemConfig(encoder="crnn", decoder={
        stage: cfg for stage, (cfg, _) in converted.items()}), encoder=kong.note,
        decoder_device="meta")
    for stage, (_, state) in converted.items():
        system.decoders[stage].load_state_dict(state, strict=True, assign=True)
        system.decoders[stage].reset_buffers()
    files = {"encoder": str(path), **{stage: str(file) for stage, file in stages.items()}}
    source = SourceSpec(checkpoint=str(stages["onset"]), sha256=file_sha256(stages["onset"]),
                        metadata={"importer": "authors", "encoder_kind": kind,
                                  "files": files,
                                  "sha256": {k: file_sha256(f) for k, f in files.items()}})
    return _write_folder(out, lambda tmp: export_model(
        system.eval(), tmp, precision, metadata={"rolls": KONG_ROLLS.thresholds.to_dict()},
        source=source))


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
    authors = sub.add_parser("authors", help="the LLM decoder's authors' stage checkpoints "
                             "(EncDecPos state dicts) over Kong's CRNN")
    for stage in ("onset", "velocity", "offset"):
        authors.add_argument(f"--{stage}", required=True, help=f"the {stage} stage's step=N.pth")
    authors.add_argument("--encoder", required=True, metavar="KIND=PATH", help="the encoder "
                         "all three stages read (one per stage is not supported yet): "
                         + "; ".join(f"{k}: {v}" for k, v in ENCODER_KINDS.items()))
    authors.add_argument("--heads", type=int, required=True, help="attention heads per layer "
                         "(their CRNN configs: 16); the shapes cannot tell")
    authors.add_argument("--out", required=True, help="the model folder to write")
    authors.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32")
    authors.add_argument("--overwrite", action="store_true",
                         help="replace a model folder that exists")
    authors.add_argument("--trust-pickle", action="store_true", help="open a checkpoint that "
                         "holds pickled Python objects (unpickling runs the code it names: only "
                         "for files you trust)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    t0 = time.perf_counter()
    try:
        if args.kind == "kong":
            if not Path(args.checkpoint).is_file():
                raise ImportFailed(f"{args.checkpoint}: no such file")
            manifest = import_kong(args.checkpoint, args.out, args.precision, args.overwrite)
            what = "rolls-only: notes and pedals by Kong's post-processor"
        else:
            stages = {s: getattr(args, s) for s in ("onset", "velocity", "offset")}
            for file in (*stages.values(), args.encoder.partition("=")[2]):
                if file and not Path(file).is_file():
                    raise ImportFailed(f"{file}: no such file")
            manifest = import_authors(stages, args.encoder, args.heads, args.out,
                                      args.precision, args.overwrite, args.trust_pickle)
            what = f"stages {', '.join(manifest.stage_names)}"
    except (ImportFailed, OSError, ValueError) as e:
        print(f"pianolm import: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({manifest.precision}, {what}) in "
          f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_import())
