"""The shipped model with roll-prior stages at their initialisation: what train_prior.sh starts
from (the shipped stages' weights, the prior deciding its slots), exported to evaluate.

    python recipes/default_model/prior_at_init.py --out work/models/prior-init
    pianolm eval --data ../shared/devset --model work/models/prior-init

    # greedy validation scores of the onset stage at init against the shipped one, on the
    # validation segments train_prior.sh trains with (the scores its training log reports)
    python recipes/default_model/prior_at_init.py --validation work/emb/prior/mix \
        --json recipes/default_model/record/lm-onset-prior-at-init-val.json

The encoder and roll thresholds are the shipped ones (engines/default), so `--decoder rolls`
on the folder gives the shipped rolls' notes.
"""

from __future__ import annotations

import argparse
import json
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


def validation_scores(embeddings: Path, rolls: RollDecodeConfig, stage: str = "onset"
                      ) -> dict[str, dict[str, float]]:
    """Greedy decode scores on 12 validation segments, as `pianolm train lm` reports them: the
    stage with the prior at init, and the shipped stage."""
    from pianolm.export.train.embeddings import load_embeddings_index, load_items
    from pianolm.export.train.examples import EmbeddingStore, build_examples, spread_examples
    from pianolm.export.train.lm import decode_scores

    items = load_items(embeddings, "validation", load_embeddings_index(embeddings))
    out = {}
    for name, decoder in (("prior_at_init", prior_stage(stage, rolls)),
                          ("shipped", load_decoder(RECORD / f"lm-{stage}-time")[0].eval())):
        examples, _ = build_examples(items, stage, (0.0,), decoder.cfg.max_seq_len)
        out[name] = decode_scores(stage, decoder, spread_examples(examples, 12),
                                  EmbeddingStore(items), 8)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="export the system here")
    ap.add_argument("--validation", type=Path, help="an embeddings folder: score the onset "
                    "stage at init and the shipped one on its validation segments")
    ap.add_argument("--json", type=Path, help="write --validation's scores here")
    args = ap.parse_args()
    encoder, meta = load_encoder(RECORD / "encoder-gen2")
    if args.validation:
        scores = validation_scores(args.validation, roll_config(meta))
        print(json.dumps(scores, indent=1))
        if args.json:
            args.json.write_text(json.dumps(scores, indent=1) + "\n")
    if not args.out:
        return
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
