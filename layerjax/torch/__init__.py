"""A trained layer decomposer in PyTorch (the `[torch]` extra): `LayerDecomposerPipeline`
(`layerjax.torch.pipeline`), what a PyTorch user calls; the modules
(`layerjax.torch.modules`), the exported folder (`layerjax.torch.folder`, written by
`python -m layerjax.convert to-pytorch`), the sampler (`layerjax.torch.sampling`) and the
backend the inference driver calls (`layerjax.torch.backend.TorchBackend`). JAX and Flax are
never imported. The component classes are importable from here, as diffusers' pipeline
loading looks them up by the library named in model_index.json.
"""

from layerjax.torch.backend import TorchBackend
from layerjax.torch.modules import ByteTextEncoder, ConvHead, DecoderHead, LayerEmbedding
from layerjax.torch.pipeline import LayerDecomposerPipeline

__all__ = ['ByteTextEncoder', 'ConvHead', 'DecoderHead', 'LayerEmbedding',
           'LayerDecomposerPipeline', 'TorchBackend']
