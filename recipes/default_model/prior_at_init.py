"""The shipped model with roll-prior stages at their initialisation: what train_prior.sh starts
from (the shipped stages' weights, the prior deciding its slots), exported to evaluate.

    python recipes/default_model/prior_at_init.py --out work/models/prior-init
    pianolm eval --data ../shared/devset --model work/models/prior-init --decoder lm

The encoder and roll thresholds are the shipped ones (engines/default), so `--decoder rolls`
on the folder gives the shipped rolls' notes.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from pianolm.export.decoder import Decoder
from pianolm.export.onnx_export import export_model
from pianolm.export.system import SystemConfig, TranscriptionSystem
from pianolm.export.train.encoder import load_encoder, roll_config
from pianolm.export.train.lm import load_decoder
from pianolm.runtime import vocab
from pianolm.runtime.manifest import load_manifest, write_manifest
from pianolm.runtime.rolls import RollDecodeConfig

ROOT = Path(__file__).resolve().parents[2]
RECORD = Path(__file__).resolve().parent / "record"


def prior_stage(stage: str, rolls: RollDecodeConfig) -> Decoder:
    """The shipped stage's weights in a decoder with the stage's roll prior calibrated from the
    encoder's tuned thresholds, as `pianolm train lm --roll-prior --init` starts it."""
    shipped, _ = load_decoder(RECORD / f"lm-{stage}-time")
    decoder = Decoder(replace(shipped.cfg, roll_prior=stage))
    decoder.load_state_dict(shipped.state_dict(), strict=False)
    decoder.start_from_the_rolls()
    decoder.prior.calibrate(rolls.onset_threshold, rolls.offset_threshold,
                            rolls.frame_threshold, rolls.velocity_curve)
    return decoder.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    encoder, meta = load_encoder(RECORD / "encoder-gen2")
    stages = {stage: prior_stage(stage, roll_config(meta)) for stage in vocab.STAGES}
    system = TranscriptionSystem(SystemConfig(encoder=meta["encoder"], decoder={
        s: d.cfg for s, d in stages.items()}), encoder=encoder)
    for s, d in stages.items():
        system.decoders[s].load_state_dict(d.state_dict())
    manifest = export_model(system.eval(), args.out, metadata={"note": "roll prior at init"})
    shipped = load_manifest(ROOT / "engines" / "default")
    write_manifest(replace(manifest, encoder=replace(manifest.encoder,
                                                     rolls=shipped.encoder.rolls)), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
