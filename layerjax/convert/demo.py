"""End-to-end conversion demo on a tiny random SD3.5-shaped pipeline (CPU, no downloads).

  python -m layerjax.convert.demo OUT_DIR

Builds a small diffusers pipeline folder (transformer with dual attention and qk RMSNorm,
plus an SD3-style VAE) with random weights, converts it to Orbax and back with the CLI,
reloads the export with diffusers, and prints how far the Flax models are from diffusers.
Needs the [torch] extra.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel

from layerjax import cli
from layerjax.convert import __main__ as convert_cli
from layerjax.convert.diffusers import load_transformer, load_vae

TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=4,
                   attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                   caption_projection_dim=128, pooled_projection_dim=64, out_channels=16,
                   pos_embed_max_size=24, dual_attention_layers=(0, 1), qk_norm='rms_norm')
VAE = dict(block_out_channels=(32, 64), down_block_types=('DownEncoderBlock2D',) * 2,
           up_block_types=('UpDecoderBlock2D',) * 2, layers_per_block=2, norm_num_groups=16,
           latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
           shift_factor=0.0609, scaling_factor=1.5305)


def _nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


def _rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@cli.entry
def main(argv: list[str]) -> int:
  p = cli.ArgumentParser(prog='python -m layerjax.convert.demo', description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('out', type=Path, help='where the random pipeline and its conversions go')
  out = p.parse_args(argv).out
  torch.manual_seed(0)
  src = out / 'diffusers'
  transformer = SD3Transformer2DModel(**TRANSFORMER).eval()
  vae = AutoencoderKL(**VAE).eval()
  with torch.no_grad():  # diffusers zero-initialises the AdaLN gates; make every weight count
    for p in transformer.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  transformer.save_pretrained(src / 'transformer')
  vae.save_pretrained(src / 'vae')
  print(f'random pipeline written to {src}')

  # The demo owns its folders: a re-run replaces its earlier conversions.
  for argv in (['from-diffusers', str(src), str(out / 'orbax'), '--overwrite'],
               ['to-diffusers', str(out / 'orbax'), str(out / 'export'), '--overwrite']):
    print('$ python -m layerjax.convert', ' '.join(argv))
    code = convert_cli.main(argv)  # which printed its error, if any
    if code:
      return code

  g = torch.Generator().manual_seed(1)
  latents = torch.randn(2, 16, 12, 20, generator=g)
  text = torch.randn(2, 9, 64, generator=g)
  pooled = torch.randn(2, 64, generator=g)
  sigma = torch.tensor([0.9, 0.3])
  images = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1

  exported = SD3Transformer2DModel.from_pretrained(out / 'export' / 'transformer').eval()
  exported_vae = AutoencoderKL.from_pretrained(out / 'export' / 'vae').eval()
  flax_t, flax_v = load_transformer(src), load_vae(src)
  with torch.no_grad():
    ref = _nhwc(transformer(latents, text, pooled, sigma * 1000).sample)
    back = _nhwc(exported(latents, text, pooled, sigma * 1000).sample)
    ref_mean = _nhwc(vae.encode(images).latent_dist.mean)
    ref_img = _nhwc(vae.decode(latents[:, :, :4, :6]).sample)
    back_img = _nhwc(exported_vae.decode(latents[:, :, :4, :6]).sample)
  ours = flax_t(jnp.asarray(_nhwc(latents)), text.numpy(), pooled.numpy(),
                sigma.numpy() * 1000)
  mean, _ = flax_v.encode(jnp.asarray(_nhwc(images)))
  img = flax_v.decode(jnp.asarray(_nhwc(latents[:, :, :4, :6])))
  print(f'transformer  Flax vs diffusers, relative error: {_rel_err(ours, ref):.2e}')
  print(f'vae encode   Flax vs diffusers, relative error: {_rel_err(mean, ref_mean):.2e}')
  print(f'vae decode   Flax vs diffusers, relative error: {_rel_err(img, ref_img):.2e}')
  print(f'export round trip, transformer output identical: {np.array_equal(back, ref)}')
  print(f'export round trip, vae decode identical: {np.array_equal(back_img, ref_img)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
