"""Weight conversion: diffusers folders <-> layerjax models <-> Orbax checkpoints.

CLI: `python -m layerjax.convert`.
"""
