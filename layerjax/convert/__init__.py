"""Weight conversion between diffusers folders, layerjax models and Orbax checkpoints; `python -m layerjax.convert`."""
