"""Editing a decomposition with its shadows following: `Document` (move, scale, remove,
recolour, reorder, replace the background, render), and `python -m layerjax.edit`."""

from layerjax.edit.document import Document, EditError

__all__ = ['Document', 'EditError']
