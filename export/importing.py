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
over their encoder (Kong's CRNN or their HPPNet, fine-tuned once per stage or shared; or a
pianolm folder's encoder graph): a folder with LM stages, which `pianolm transcribe` decodes,
the offset stage in their layout (carried notes in a sequence of their own).

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from pianolm.runtime.manifest import (
    MANIFEST_FILE,
    Manifest,
    RollsSpec,
    SourceSpec,
    file_sha256,
    load_manifest,
)
from pianolm.runtime.rolls import RollDecodeConfig

if TYPE_CHECKING:
    from torch import nn

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
                 "(Note_pedal.state_dict(), step=N_encoder.pth)",
                 "hppnet": "the authors' HPPNet (its state dict, step=N_encoder.pth; a pickled "
                 "module with --trust-pickle)",
                 "pianolm": "a pianolm model folder's fp32 encoder graph (crnn or hppnet)"}


def _load_encoder(kind: str, path: Path, trust_pickle: bool) -> nn.Module:
    """One encoder file of ENCODER_KINDS -> the pianolm encoder module holding its weights."""
    from pianolm.export.authors import load_hppnet_encoder
    from pianolm.export.kong import load_kong_checkpoint

    if kind == "hppnet":
        return load_hppnet_encoder(path, trust_pickle)
    return load_kong_checkpoint(path)[0].note  # reads the Zenodo layout and a flat Note_pedal


def _folder_encoder(path: Path) -> nn.Module:
    from pianolm.export.folder_encoder import FolderEncoder
    from pianolm.runtime.manifest import ManifestError

    try:
        return FolderEncoder(path)
    except ManifestError as e:
        raise ImportFailed(str(e)) from None


def _family(kind: str, encoder: nn.Module) -> str:
    """The authors' encoder family their decoders were trained over: the embedding layout the
    converter maps their input columns from (export/authors.py)."""
    if kind != "pianolm":
        return "hppnet" if kind == "hppnet" else "crnn"
    name = encoder.spec.name
    if name.startswith("hppnet"):
        return "hppnet"
    if name in ("crnn", "kong-crnn"):
        return "crnn"
    raise ImportFailed(f"{encoder.manifest.folder}: its encoder {name!r} is neither a CRNN nor "
                       "an HPPNet, the encoders the authors' decoders read")


def _file_sha256(path: Path) -> str:
    """A file's sha256; a model folder's is its manifest's (which holds every graph's)."""
    return file_sha256(path / MANIFEST_FILE if path.is_dir() else path)


def _encoder_kind(encoder: str) -> tuple[str, Path]:
    """--encoder KIND=PATH -> (KIND, PATH), checked."""
    kind, _, path = encoder.partition("=")
    if kind not in ENCODER_KINDS or not path:
        raise ImportFailed(f"--encoder {encoder!r}: expected KIND=PATH with KIND one of "
                           f"{', '.join(ENCODER_KINDS)}")
    return kind, Path(path)


def _stage_encoders(encoder: str, stage_encoders: dict[str, str | Path],
                    trust_pickle: bool, sha256: Mapping[str, str]) -> nn.Module:
    """--encoder KIND=PATH and --STAGE-encoder PATH (the same kind) -> the system's encoder
    module: one encoder when every stage reads the same file, else StageEncoders running each
    distinct file once (files with the same bytes are one encoder: `sha256` holds each file's,
    keyed "encoder" and "STAGE_encoder"). The rolls are --encoder's."""
    from pianolm.export.stage_encoders import StageEncoders

    kind, path = _encoder_kind(encoder)
    if kind == "pianolm":
        if stage_encoders:
            raise ImportFailed("--onset/velocity/offset-encoder take encoder files; an encoder "
                               "from a model folder (pianolm=) serves every stage")
        return _folder_encoder(path)
    files = {"encoder": path, **{s: Path(f) for s, f in stage_encoders.items()}}
    by_hash: dict[str, str] = {}  # sha256 -> the name of the first file with those bytes
    names = {who: by_hash.setdefault(sha256["encoder" if who == "encoder" else f"{who}_encoder"],
                                     who) for who in files}
    loaded = {name: _load_encoder(kind, files[name], trust_pickle)
              for name in dict.fromkeys(names.values())}
    reads = {stage: names.get(stage, "encoder") for stage in ("onset", "velocity", "offset")}
    if len(loaded) == 1:
        return loaded["encoder"]
    return StageEncoders(loaded, reads, rolls_from="encoder")


def import_authors(stages: dict[str, str | Path], encoder: str, heads: int, out: str | Path,
                   precision: str = "fp32", overwrite: bool = False,
                   trust_pickle: bool = False,
                   stage_encoders: dict[str, str | Path] | None = None,
                   carried: str = "separate") -> Manifest:
    """The authors' three stage decoders -> an LM model folder; returns its manifest.
    `encoder` is KIND=PATH (ENCODER_KINDS): the encoder of the rolls and of every stage not in
    `stage_encoders` ({stage: PATH}, the encoder their training fine-tuned with that stage).
    `carried`: the offset stage's layout, "separate" as their inference decodes it."""
    from pianolm.export.authors import AuthorsImportError, convert_decoder, load_stage_checkpoint
    from pianolm.export.kong import KongImportError
    from pianolm.export.onnx_export import export_model
    from pianolm.export.system import SystemConfig, TranscriptionSystem

    stage_encoders = dict(stage_encoders or {})
    kind, _ = _encoder_kind(encoder)
    out = Path(out)
    _check_out(out, overwrite)
    files = {"encoder": str(encoder.partition("=")[2]),
             **{f"{stage}_encoder": str(file) for stage, file in stage_encoders.items()},
             **{stage: str(file) for stage, file in stages.items()}}
    sha256 = {k: _file_sha256(Path(f)) for k, f in files.items()}  # each file read once
    try:
        system_encoder = _stage_encoders(encoder, stage_encoders, trust_pickle, sha256)
        family = _family(kind, system_encoder)
        converted = {stage: convert_decoder(load_stage_checkpoint(file, trust_pickle), heads,
                                            family, source=str(file))
                     for stage, file in stages.items()}
    except (KongImportError, AuthorsImportError) as e:
        raise ImportFailed(str(e)) from None
    parts = getattr(system_encoder, "stage_parts", {})
    configs = {stage: replace(cfg, enc_offset=parts.get(stage, (0,))[0],
                              carried=carried if stage == "offset" else "after")
               for stage, (cfg, _) in converted.items()}
    system = TranscriptionSystem(SystemConfig(encoder=family, decoder=configs),
                                 encoder=system_encoder, decoder_device="meta")
    for stage, (_, state) in converted.items():
        system.decoders[stage].load_state_dict(state, strict=True, assign=True)
        system.decoders[stage].reset_buffers()
    source = SourceSpec(checkpoint=str(stages["onset"]), sha256=sha256["onset"],
                        metadata={"importer": "authors", "encoder_kind": kind, "files": files,
                                  "sha256": sha256})
    # Kong's CRNN keeps Kong's roll thresholds; HPPNet's rolls take runtime/rolls.py's defaults
    rolls = {"rolls": KONG_ROLLS.thresholds.to_dict()} if family == "crnn" else None
    return _write_folder(out, lambda tmp: export_model(system.eval(), tmp, precision,
                                                       metadata=rolls, source=source))


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
                         "of the rolls and of every stage without its own: "
                         + "; ".join(f"{k}: {v}" for k, v in ENCODER_KINDS.items()))
    for stage in ("onset", "velocity", "offset"):
        authors.add_argument(f"--{stage}-encoder", metavar="PATH", help=f"the encoder their "
                             f"training fine-tuned with the {stage} stage (its "
                             f"step=N_encoder.pth)")
    authors.add_argument("--heads", type=int, required=True, help="attention heads per layer "
                         "(their CRNN configs: 16); the shapes cannot tell")
    authors.add_argument("--out", required=True, help="the model folder to write")
    authors.add_argument("--carried", choices=("separate", "after"), default="separate",
                         help="the offset stage's carried notes: in a sequence of their own, as "
                              "their inference script decodes them (default), or after the "
                              "segment's own notes as pianolm's decoders do")
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
            encoders = {s: getattr(args, f"{s}_encoder") for s in stages
                        if getattr(args, f"{s}_encoder")}
            for file in (*stages.values(), *encoders.values()):
                if not Path(file).is_file():
                    raise ImportFailed(f"{file}: no such file")
            kind, path = args.encoder.partition("=")[::2]
            if path and not (Path(path).is_dir() if kind == "pianolm" else Path(path).is_file()):
                raise ImportFailed(f"{path}: no such {'folder' if kind == 'pianolm' else 'file'}")
            manifest = import_authors(stages, args.encoder, args.heads, args.out,
                                      args.precision, args.overwrite, args.trust_pickle,
                                      encoders, args.carried)
            what = f"stages {', '.join(manifest.stage_names)}"
    except (ImportFailed, OSError, ValueError) as e:
        print(f"pianolm import: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({manifest.precision}, {what}) in "
          f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_import())
