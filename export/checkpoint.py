"""Save and load a TranscriptionSystem: a folder with `config.json` and `model.safetensors`.

config.json:
    format           "pianolm-checkpoint"
    format_version   1 (a loader refuses newer versions)
    pianolm_version  the package version that wrote it
    encoder          a name in export/encoders.py ENCODERS ("crnn", "hppnet", "hppnet-cpu", ...)
    hierarchical     true (stages onset/velocity/offset) | false (stage "flat")
    stages           the stage names, in decode order
    decoders         {stage: DecoderConfig fields}
    weights          the weights file name, "model.safetensors"
    metadata         free-form (training run, data, steps), optional

The weights file holds the whole state dict (encoder + decoders); the RoPE / audio-PE tables
are derived and not stored. `checkpoint_hash` (sha256 of the weights) goes into manifests.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import pianolm
from pianolm.export.decoder import DecoderConfig
from pianolm.export.system import SystemConfig, TranscriptionSystem

FORMAT = "pianolm-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the field."""


def _folder(path: str | Path) -> Path:
    """Accept the checkpoint folder or any file inside it."""
    p = Path(path)
    return p.parent if p.is_file() or p.suffix in (".json", ".safetensors") else p


def save_system(system: TranscriptionSystem, path: str | Path,
                metadata: Mapping[str, Any] | None = None) -> Path:
    """Write `path/config.json` and `path/model.safetensors`; returns the folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pianolm_version": pianolm.__version__,
        "encoder": system.config.encoder,
        "hierarchical": system.config.hierarchical,
        "stages": list(system.stages),
        "decoders": {s: c.to_dict() for s, c in system.decoder_configs.items()},
        "weights": WEIGHTS_FILE,
        "metadata": dict(metadata or {}),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in system.state_dict().items()}
    # weights first, config last: a folder with a config always has its weights
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT,
                                                            "format_version": str(FORMAT_VERSION)})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _field(cfg: Mapping[str, Any], name: str, kind: type | tuple[type, ...], where: Path) -> Any:
    if name not in cfg:
        raise CheckpointError(f"{where}: missing field {name!r}")
    value = cfg[name]
    # bool is an int in Python: keep "hierarchical": 1 and "format_version": true apart
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise CheckpointError(f"{where}: field {name!r} must be {names}, got {value!r}")
    return value


def read_config(path: str | Path) -> tuple[SystemConfig, dict[str, Any]]:
    """Parse and validate config.json; returns the SystemConfig and the raw dict."""
    folder = _folder(path)
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such checkpoint folder "
                              f"(expected {CONFIG_FILE} and {WEIGHTS_FILE} inside)")
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing (not a pianolm checkpoint folder?)")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not readable JSON: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path}: top level must be an object")

    fmt = _field(raw, "format", str, cfg_path)
    if fmt != FORMAT:
        raise CheckpointError(f"{cfg_path}: field 'format' is {fmt!r}, expected {FORMAT!r}")
    version = _field(raw, "format_version", int, cfg_path)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: field 'format_version' is {version}; this pianolm "
                              f"({pianolm.__version__}) reads up to {FORMAT_VERSION}: upgrade")
    encoder = _field(raw, "encoder", str, cfg_path)
    hierarchical = _field(raw, "hierarchical", bool, cfg_path)
    stages = _field(raw, "stages", list, cfg_path)
    expected = list(SystemConfig(hierarchical=hierarchical).stages)
    if stages != expected:
        raise CheckpointError(f"{cfg_path}: field 'stages' is {stages}, expected {expected} "
                              f"for hierarchical={hierarchical}")
    decoders = _field(raw, "decoders", dict, cfg_path)
    dec_cfgs: dict[str, DecoderConfig] = {}
    for stage in stages:
        if stage not in decoders:
            raise CheckpointError(f"{cfg_path}: missing field 'decoders.{stage}'")
        if not isinstance(decoders[stage], dict):
            raise CheckpointError(f"{cfg_path}: field 'decoders.{stage}' must be an object")
        try:
            dec_cfgs[stage] = DecoderConfig.from_dict(decoders[stage])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{cfg_path}: field 'decoders.{stage}': {e}") from e
    extra = sorted(set(decoders) - set(stages))
    if extra:
        raise CheckpointError(f"{cfg_path}: field 'decoders' has unknown stage(s) {extra}")
    weights = _field(raw, "weights", str, cfg_path)
    if Path(weights).name != weights:
        raise CheckpointError(f"{cfg_path}: field 'weights' must be a file name in the folder, "
                              f"got {weights!r}")
    return SystemConfig(encoder=encoder, decoder=dec_cfgs, hierarchical=hierarchical), raw


def load_system(path: str | Path, device: torch.device | str = "cpu") -> TranscriptionSystem:
    """Rebuild the system from config.json and load the weights, checking every tensor."""
    folder = _folder(path)
    config, raw = read_config(folder)
    cfg_path = folder / CONFIG_FILE
    weights_path = folder / raw["weights"]
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing (named by {cfg_path} field 'weights')")
    try:
        # decoders on meta: no allocation or init for weights that are overwritten anyway
        system = TranscriptionSystem(config, decoder_device="meta")
    except Exception as e:  # unknown encoder, enc_dim mismatch, ...
        raise CheckpointError(f"{cfg_path}: cannot build the system it describes: {e}") from e

    expected = system.state_dict()
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            keys = set(f.keys())
            missing = sorted(set(expected) - keys)
            unexpected = sorted(keys - set(expected))
            if missing or unexpected:
                raise CheckpointError(
                    f"{weights_path}: tensors do not match {cfg_path}: "
                    f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                    f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
            for name, ref in expected.items():
                shape = list(f.get_slice(name).get_shape())
                if shape != list(ref.shape):
                    raise CheckpointError(f"{weights_path}: tensor {name!r} has shape {shape}, "
                                          f"expected {list(ref.shape)} from {cfg_path}")
                state[name] = f.get_tensor(name).to(dtype=ref.dtype)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file: {e}") from e

    system.load_state_dict(state, strict=True, assign=True)
    for dec in system.decoders.values():
        dec.reset_buffers()
    system.encoder.requires_grad_(False)
    return system.to(device).eval()


def checkpoint_hash(path: str | Path) -> str:
    """sha256 (hex) of the checkpoint's weights file, for manifests."""
    p = Path(path)
    if p.is_dir() or p.name == CONFIG_FILE:
        _, raw = read_config(p)
        p = _folder(p) / raw["weights"]
    if not p.is_file():
        raise CheckpointError(f"{p}: missing weights file")
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


__all__ = ["CheckpointError", "FORMAT_VERSION", "checkpoint_hash", "load_system", "read_config",
           "save_system"]
