"""Flax NNX models: SD3/SD3.5 MMDiT (`mmdit`), SD3 VAE (`vae`), alpha/shadow decoders
(`heads`)."""
