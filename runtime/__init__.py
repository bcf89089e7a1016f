"""pianolm.runtime: the deployable side. numpy + onnxruntime + soundfile + mido; never torch."""
