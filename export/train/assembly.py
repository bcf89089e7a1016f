"""Assembling a TranscriptionSystem checkpoint from trained runs (`pianolm train assemble`).

    assemble_system("runs/hppnet", {"onset": "runs/lm-onset", "velocity": "runs/lm-velocity",
                                    "offset": "runs/lm-offset"}, "runs/system")
    pianolm train assemble --encoder-dir runs/hppnet --onset runs/lm-onset \
        --velocity runs/lm-velocity --offset runs/lm-offset --out runs/system

One encoder run (encoder.py) and one LM run per stage (lm.py; or a single flat one) become a
checkpoint folder (export/checkpoint.py), with the encoder's tuned roll thresholds
(thresholds.py) and where every part came from in its metadata.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

from pianolm.runtime import vocab as V
from pianolm.runtime.tokens import ALL_STAGES

from .encoder import BEST_FILE as ENC_BEST
from .encoder import ENCODER_FILE, load_encoder
from .lm import load_decoder


def assemble_system(encoder_dir: str | os.PathLike, decoder_dirs: Mapping[str, str | os.PathLike],
                    out_dir: str | os.PathLike, best: bool = True, encoder_best: bool = False,
                    force: bool = False) -> Path:
    """Encoder run + one LM run per stage -> a checkpoint folder (export/checkpoint.py).

    The decoders must have been trained on embeddings of these very encoder weights (checked
    through the embeddings index's sha256 unless `force`). Roll-decoding thresholds tuned for
    the encoder travel in the checkpoint's metadata ("rolls").
    """
    from pianolm.export.checkpoint import checkpoint_hash, save_system
    from pianolm.export.system import SystemConfig, TranscriptionSystem

    encoder, emeta = load_encoder(encoder_dir, best=encoder_best)
    enc_file = Path(encoder_dir) / (ENC_BEST if encoder_best and
                                    (Path(encoder_dir) / ENC_BEST).is_file() else ENCODER_FILE)
    enc_sha = checkpoint_hash(enc_file)
    stages = tuple(decoder_dirs)
    if set(stages) not in ({"onset", "velocity", "offset"}, {"flat"}):
        raise ValueError(f"need decoders for onset, velocity, offset (or flat), got {stages}")
    decoders, metas = {}, {}
    for stage, folder in decoder_dirs.items():
        dec, meta = load_decoder(folder, best=best)
        if meta["stage"] != stage:
            raise ValueError(f"{folder}: trained for stage {meta['stage']!r}, not {stage!r}")
        src = (meta.get("encoder") or {}).get("source") or {}
        if not force and src.get("sha256") and src["sha256"] != enc_sha:
            raise ValueError(f"{folder}: trained on embeddings of other encoder weights "
                             f"({src.get('encoder_dir')}); pass force=True to combine anyway")
        decoders[stage], metas[stage] = dec, meta
    hierarchical = stages != ("flat",)
    config = SystemConfig(encoder=emeta["encoder"],
                          decoder={s: decoders[s].cfg for s in (V.STAGES if hierarchical
                                                                 else ("flat",))},
                          hierarchical=hierarchical)
    system = TranscriptionSystem(config, encoder=encoder, decoder_device="meta")
    for stage, dec in decoders.items():
        system.decoders[stage].load_state_dict(dec.state_dict(), strict=True, assign=True)
        system.decoders[stage].reset_buffers()
    metadata = {"encoder_run": str(encoder_dir), "encoder_sha256": enc_sha,
                "encoder_step": emeta.get("step"), "rolls": emeta.get("rolls"),
                "targets": emeta.get("targets"),
                "decoders": {s: {"run": str(decoder_dirs[s]), "step": m.get("step"),
                                 "val": m.get("val"), "best": best} for s, m in metas.items()}}
    return save_system(system, out_dir, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# CLI


def add_cli(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("assemble", help="encoder + stage decoders -> a system checkpoint")
    a.add_argument("--encoder-dir", required=True)
    for stage in ALL_STAGES:
        a.add_argument(f"--{stage}", metavar="DIR", help=f"{stage} LM run folder")
    a.add_argument("--out", required=True, help="checkpoint folder to write")
    a.add_argument("--last", action="store_true", help="latest decoder weights, not best")
    a.add_argument("--encoder-best", action="store_true", help="encoder best.safetensors")
    a.add_argument("--force", action="store_true", help="skip the encoder-weights check")
    a.set_defaults(func=_run_assemble)


def _run_assemble(args: argparse.Namespace) -> int:
    dirs = {s: getattr(args, s) for s in ALL_STAGES if getattr(args, s)}
    path = assemble_system(args.encoder_dir, dirs, args.out, best=not args.last,
                           encoder_best=args.encoder_best, force=args.force)
    print(f"wrote {path}")
    return 0
