"""Exported models. `default/` is the shipped default model (package data)."""

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).parent / "default"
