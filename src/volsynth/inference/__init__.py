"""volsynth.inference."""
