"""Flax NNX models: the SD3/SD3.5 MMDiT (`mmdit`), the SD3 VAE (`vae`), alpha and shadow decoders (`heads`)."""
