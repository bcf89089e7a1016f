"""Notes tables (runtime/midi.py TSV) compared as numbers, not bytes."""

from __future__ import annotations


def table_rows(tsv: str) -> list[tuple[str, ...]]:
    return [tuple(line.split("\t")) for line in tsv.splitlines()[1:]]


def close_tables(a: str, b: str, seconds: float = 1e-4) -> bool:
    """Two notes tables (pedal rows included) equal up to `seconds` in times and 1 in velocity.
    ONNX Runtime's CRNN kernels round differently by batch shape (~1e-6 in the rolls), which
    moves a sub-frame time by ~1e-8 s and can flip the last printed digit or int(v x 128)."""
    ra, rb = table_rows(a), table_rows(b)
    return len(ra) == len(rb) and all(
        x[2] == y[2] and abs(float(x[0]) - float(y[0])) <= seconds
        and abs(float(x[1]) - float(y[1])) <= seconds
        and (x[2] == "pedal" or abs(int(x[3]) - int(y[3])) <= 1) for x, y in zip(ra, rb))
