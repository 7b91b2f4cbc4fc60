"""volsynth.data."""
