"""Networks and building blocks; every network takes ``spatial_dims``."""
