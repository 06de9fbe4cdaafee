"""transformer: decoder-only, encoder-decoder and encoder-only transformers in JAX / Flax NNX."""
