"""pianolm.export.data: training data. Generated and corpus MIDI, renderers, augmentation,
a rendered-dataset layout on disk, and a MAESTRO v3 loader.

Modules (each imports only what it needs; nothing here imports torch):
  common    Piece, Pedal, note-list helpers (tidy, crop, density)
  generate  generated material from a seed (chords, arpeggios, scales, runs, repeats, ...)
  corpus    music21 corpus pieces, humanised; which pieces are train / validation / held out
  render    render(notes, pedal, instrument, seed) -> float32 mono 16 kHz
  augment   gain, EQ tilt, reverb, noise, detune (labels time-scaled with the audio)
  dataset   render_dataset(...) writes <root>/<split>/<id>.flac + .tsv + .pedal.tsv + index.json
  maestro   MAESTRO v3 metadata (CSV/JSON) + WAV + MIDI -> (audio path, notes, pedal)
"""
