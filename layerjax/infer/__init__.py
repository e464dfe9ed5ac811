"""Inference: the decomposer model on disk and loaded for use."""
