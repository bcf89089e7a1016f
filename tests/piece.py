"""The little piece the shipped-model test transcribes (scale, chords, repeated notes, two
hands), and the committed rendering of it: tests/data/piece.flac with its notes in
tests/data/piece.tsv, made by `python -m tests.piece` (Salamander Grand, the NumPy sampler of
export/data/render.py, peak 0.7), so the test runs even where the renderers are not installed.
"""

from __future__ import annotations

from pathlib import Path

from pianolm.runtime.notes import Note

DATA = Path(__file__).parent / "data"
CLIP, NOTES = DATA / "piece.flac", DATA / "piece.tsv"
PEAK = 0.7


def piece() -> list[Note]:
    notes: list[Note] = []
    t = 0.3
    for i, p in enumerate([60, 62, 64, 65, 67, 69, 71, 72]):  # C major scale, rising loudness
        notes.append(Note(t, t + 0.25, p, 40 + 8 * i))
        t += 0.3
    for chord in ([48, 55, 64], [53, 57, 65, 72], [43, 55, 62, 71]):  # block chords
        notes += [Note(t, t + 0.8, p, 85) for p in chord]
        t += 1.0
    for _ in range(4):  # repeated notes
        notes.append(Note(t, t + 0.12, 76, 70))
        t += 0.2
    for k, p in enumerate([36, 43, 48, 52, 55, 60, 64, 67]):  # an arpeggio over a held bass
        notes.append(Note(t + 0.15 * k, t + 1.6, p, 60 + 5 * k))
    return notes


def render_piece(instrument: str, path: Path) -> None:
    """piece() rendered with `instrument`, scaled to PEAK, written as 16 kHz audio."""
    import numpy as np
    import soundfile as sf

    from pianolm.export.data import render

    notes = piece()
    audio = render.render(notes, [], instrument, seed=0,
                          duration=max(n.offset for n in notes) + 1.0)
    sf.write(path, PEAK * audio / max(1e-6, float(np.abs(audio).max())), 16000)


if __name__ == "__main__":
    from pianolm.runtime.midi import write_notes_tsv

    DATA.mkdir(exist_ok=True)
    render_piece("salamander", CLIP)
    write_notes_tsv(piece(), NOTES)
    print(f"wrote {CLIP} and {NOTES}")
