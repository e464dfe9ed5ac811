"""layerjax: natural-image layer decomposition in JAX / Flax NNX (see README.md)."""
