"""pianolm: piano transcription by hierarchical language modelling, deployable.

`pianolm.runtime` is the torch-free deployable side; `pianolm.export` is the torch side.
"""

__version__ = "0.1.0"
