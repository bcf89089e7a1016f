"""Reading a `torch.save` file a user gave: tensors only, unless they say they trust it.

`torch.load(weights_only=True)` unpickles tensors and plain containers and stops at the first
reference to a Python global (a class or function the file would call), before anything runs.
A whole pickled module is such a file: opening it runs whatever code it names, so it is opened
only when the caller passes `trust_pickle=True` (a `--trust-pickle` flag). Every failure is one
line naming the file, raised as the caller's own error class.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch


def first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "empty message"
    return line[:160]


def _load(path: Path, weights_only: bool) -> Any:
    with warnings.catch_warnings():  # a foreign pickle protocol: our errors say enough
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def load_torch_file(path: str | os.PathLike, error: type[Exception],
                    trust_pickle: bool | None = None) -> Any:
    """The object `torch.save` wrote to `path`. trust_pickle: None where the caller offers no
    way to trust a pickled file (it is refused outright), False to refuse it naming
    --trust-pickle, True to open it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    try:
        return _load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if not found:  # an unknown opcode: a text file, a plain pickle, not a torch.save
            reason = re.search(r"WeightsUnpickler error:\s*([^\n]*\S)", text)
            raise error(f"{path}: not a PyTorch checkpoint "
                        f"({reason.group(1) if reason else first_line(text)}; refused "
                        "unread)") from None
        if not trust_pickle:
            hint = "" if trust_pickle is None else (
                ": loading it runs arbitrary code, so it is opened only with --trust-pickle, "
                "if you trust where it came from")
            raise error(f"{path}: holds pickled Python objects (e.g. {found.group(1)}), not "
                        f"only tensors; refused unopened{hint}") from None
    except Exception as e:  # zip/EOF errors of a file that is not a torch.save
        raise error(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: "
                    f"{first_line(str(e))})") from None
    try:  # trusted
        return _load(path, weights_only=False)
    except Exception as e:  # the file's own code failed: report it, on one line
        raise error(f"{path}: unpickling failed ({type(e).__name__}: "
                    f"{first_line(str(e))})") from None
