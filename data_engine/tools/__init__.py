"""Tools behind interfaces, registered by kind and name (see `data_engine.core.create`)."""

from data_engine.tools import (captioner, depth, detector, inpainter, matting, quality,
                               saliency, segmenter, shadow)

__all__ = ['captioner', 'depth', 'detector', 'inpainter', 'matting', 'quality', 'saliency',
           'segmenter', 'shadow']
