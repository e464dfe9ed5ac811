"""Inference: the decomposer on disk (`model`), called on photos (`decomposer`), its
post-processing (`postprocess`) and whole-scene peeling (`scene`)."""
