"""How failures are worded: every message a user sees is one line (README "Transcribe")."""

from __future__ import annotations


def one_line(error: BaseException | str) -> str:
    """An error's text with its whitespace and line breaks folded to single spaces; an
    exception without a message is named by its type."""
    text = " ".join(str(error).split())
    return text or (type(error).__name__ if isinstance(error, BaseException) else "")
