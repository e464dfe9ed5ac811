"""Layered data: the schema shared by every part of layerjax, and (later) datasets and loaders."""
