"""Tools behind interfaces, registered by kind and name (see `data_engine.core.create`).
Model-backed tools import torch / transformers / diffusers only when one is built."""

from data_engine.tools import (captioner, clip_agreement, depth, detector, diffusers_inpaint,
                               ensemble, generator, hf_depth, hf_detectors, hf_matting,
                               hf_segmenters, inpainter, matting, quality, saliency, segmenter,
                               shadow)

__all__ = ['captioner', 'clip_agreement', 'depth', 'detector', 'diffusers_inpaint', 'ensemble',
           'generator', 'hf_depth', 'hf_detectors', 'hf_matting', 'hf_segmenters', 'inpainter',
           'matting', 'quality', 'saliency', 'segmenter', 'shadow']
