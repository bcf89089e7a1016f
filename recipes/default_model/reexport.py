"""Re-export the shipped default model (engines/default/) in the current graph format.

The shipped stage decoders were trained in a session whose LM checkpoints did not survive; their
weights live on only in the exported ONNX graphs. This script reads them back out (every MatMul
weight is named by the module scope the exporter records on its node), rebuilds the system with
the committed encoder weights (recipes/default_model/record/encoder-gen2/), checks the rebuilt
PyTorch modules against the old graphs on random inputs, saves a checkpoint and exports it over
engines/default/ with the same roll thresholds and default decoder (MODEL.md and LICENSE.md
stay). Used for manifest format 2 -> 3 (per-layer caches), and to ship a further-trained
encoder beside the same stage decoders (`--encoder-dir`: the roll thresholds `pianolm train
tune-rolls` stored in its encoder.json); kept as the record of how the shipped graphs were made.

    python recipes/default_model/reexport.py [--checkpoint work/runs/default-system]
        [--encoder-dir work/runs/hppnet-cpu2] [--out work/models/candidate]

`--out` writes the model elsewhere (default: over engines/default), to evaluate it first.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from pianolm.export.checkpoint import save_system
from pianolm.export.decoder import Decoder, DecoderConfig
from pianolm.export.onnx_export import export_model
from pianolm.export.system import SystemConfig, TranscriptionSystem
from pianolm.export.train.encoder import load_encoder
from pianolm.runtime.manifest import MANIFEST_FILE, load_manifest, write_manifest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "engines" / "default"
ENCODER_RUN = Path(__file__).resolve().parent / "record" / "encoder-gen2"  # the shipped one
KEEP = ("MODEL.md", "LICENSE.md")


def decoder_weights(*graphs: Path) -> dict[str, torch.Tensor]:
    """A Decoder state dict from its exported graphs: named initializers as they are, MatMul
    weights (stored as W^T, named val_N) by the module scope of the node that reads them."""
    state: dict[str, torch.Tensor] = {}
    for path in graphs:
        model = onnx.load(str(path))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for name, value in inits.items():
            if name.startswith("decoder.") and name != "decoder.audio_pe":  # a buffer
                state[name.removeprefix("decoder.")] = torch.from_numpy(value.copy())
        for node in model.graph.node:
            meta = {p.key: p.value for p in node.metadata_props}
            scopes = meta.get("pkg.torch.onnx.name_scopes")
            module = ast.literal_eval(scopes)[-2].removeprefix("decoder.") if scopes else ""
            if node.op_type == "MatMul" and node.input[1] in inits:
                state[module + ".weight"] = torch.from_numpy(inits[node.input[1]].T.copy())
            # a time-aligned cross-attention's per-head slopes, folded to -slope [1, H, 1, 1]
            if node.op_type == "Mul" and module.endswith(".cross"):
                folded = [inits[i] for i in node.input if i.startswith("neg_") and i in inits]
                if folded:
                    state[module + ".slope"] = torch.from_numpy(-folded[0].reshape(-1))
    return state


def check_against_old_graphs(decoder: Decoder, folder: Path, stage: str) -> float:
    """Max |logits| difference between the old stacked-cache step graph and the rebuilt module,
    on random embeddings, past and chunk."""
    rng = np.random.default_rng(0)
    c = decoder.cfg
    emb = rng.normal(size=(2, 501, c.enc_dim)).astype(np.float32)
    past = rng.normal(size=(2, c.n_layers, 2, c.n_heads, 9, c.head_dim)).astype(np.float32)
    cross_kv = ort.InferenceSession(str(folder / f"{stage}_cross_kv.onnx"))
    cross_k, cross_v = cross_kv.run(["cross_k", "cross_v"], {"embeddings": emb})
    tokens = rng.integers(0, c.vocab_size, (2, 3))
    positions = np.arange(9, 12)[None].repeat(2, 0)
    key_mask = np.ones((2, 12), dtype=bool)
    step = ort.InferenceSession(str(folder / f"{stage}_step.onnx"))
    old = step.run(["logits"], {"tokens": tokens, "positions": positions, "key_mask": key_mask,
                                "past_k": past[0], "past_v": past[1], "cross_k": cross_k,
                                "cross_v": cross_v})[0]
    with torch.inference_mode():
        t = torch.from_numpy
        new, _ = decoder.step(t(tokens), t(positions), t(key_mask),
                              [(t(past[0, i]), t(past[1, i])) for i in range(c.n_layers)],
                              decoder.cross_kv(t(emb)))
    return float(np.abs(old - new[:, -1].numpy()).max())  # the old graphs gave the last only


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="work/runs/default-system",
                    help="where to save the rebuilt system checkpoint")
    ap.add_argument("--encoder-dir", type=Path, default=ENCODER_RUN,
                    help="encoder run to ship (default: the shipped encoder's committed record, "
                         "checked against the shipped graph)")
    ap.add_argument("--out", type=Path, default=SHIPPED,
                    help="model folder to write (default: over engines/default)")
    args = ap.parse_args()
    out = args.out.resolve()
    raw = json.loads((SHIPPED / MANIFEST_FILE).read_text())
    encoder_dir = args.encoder_dir.resolve()
    encoder, encoder_meta = load_encoder(encoder_dir)
    configs = {s["name"]: DecoderConfig.from_dict(s["decoder"]) for s in raw["stages"]}
    system = TranscriptionSystem(SystemConfig(encoder=encoder_meta["encoder"], decoder=configs),
                                 encoder=encoder).eval()
    wave = (0.1 * np.random.default_rng(1).normal(size=(1, 160000))).astype(np.float32)
    old = ort.InferenceSession(str(SHIPPED / "encoder.onnx")).run(["embeddings"],
                                                                  {"waveform": wave})[0]
    with torch.inference_mode():
        err = float(np.abs(old - system.embed(torch.from_numpy(wave)).numpy()).max())
    print(f"encoder: {encoder_dir.name} vs shipped graph, max |embeddings diff| {err:.2e}")
    # fp32 CQT edge frames differ ~1e-3 between ORT and torch (test_encoders)
    if err > 1e-2 and encoder_dir == ENCODER_RUN:
        raise SystemExit("the committed encoder weights are not the shipped encoder's")
    for stage, decoder in system.decoders.items():
        state = decoder_weights(SHIPPED / f"{stage}_cross_kv.onnx", SHIPPED / f"{stage}_step.onnx")
        # buffers the module recomputes (rope tables, the pointer's tick maps) are initializers
        # of the graphs too, but not part of its state dict
        derived = {name for name, _ in decoder.named_buffers()} - set(decoder.state_dict())
        decoder.load_state_dict({k: v for k, v in state.items() if k not in derived},
                                strict=True)
        if raw["format_version"] < 3:
            err = check_against_old_graphs(decoder, SHIPPED, stage)
            print(f"{stage}: rebuilt module vs old graph, max |logits diff| {err:.2e}")
            if err > 1e-4:
                raise SystemExit(f"{stage}: the rebuilt weights do not reproduce the old graph")
    rolls = raw["encoder"]["rolls"]["thresholds"]
    if encoder_dir != ENCODER_RUN:  # a new encoder needs its own thresholds
        if "rolls" not in encoder_meta:
            raise SystemExit(f"{encoder_dir}: no tuned roll thresholds; run pianolm train "
                             f"tune-rolls --encoder-dir {encoder_dir} first")
        rolls = encoder_meta["rolls"]
    where = encoder_dir.relative_to(ROOT) if encoder_dir.is_relative_to(ROOT) else encoder_dir
    origin = (f"engines/default stage graphs (manifest format {raw['format_version']}) + "
              f"encoder {where}")
    checkpoint = save_system(system, args.checkpoint, metadata={"rolls": rolls,
                                                                "rebuilt_from": origin})
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        manifest = export_model(system, tmp, source_checkpoint=checkpoint)
        write_manifest(replace(manifest, folder=None, default_decoder=raw["default_decoder"]),
                       tmp)
        for name in KEEP:
            shutil.copy2(SHIPPED / name, Path(tmp) / name)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(tmp, out)
    out.chmod(0o755)  # mkdtemp's 0700 came along
    m = load_manifest(out)
    print(f"{out}: format {m.format_version}, default decoder {m.default_decoder}, "
          f"rolls {m.encoder.rolls.thresholds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
