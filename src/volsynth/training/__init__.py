"""volsynth.training."""
