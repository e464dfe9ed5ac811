"""RefLayer: one referred layer (the foreground RGBA) from an image and a prompt (box, mask,
point, text, or combinations), on SD3 medium, with the alpha decoder trained on latents of
the layer over a jittered checkerboard. No shadow layer, no recomposition, no degradations.

    python -m layerjax.main --config=configs/reflayer.py[:VARIANT,key=value] --workdir=DIR

Variants and keys: those of `configs/liwi.py` (default sd3_medium; demo is CPU-sized).
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location('liwi', Path(__file__).with_name('liwi.py'))
liwi = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(liwi)


def get_config(arg: str | None = None):
  first = (arg or '').split(',')[0]
  if not first or '=' in first:  # no variant named: RefLayer's own model
    arg = ','.join(p for p in ('sd3_medium', arg) if p)
  c = liwi.get_config(arg)
  c.model.layers = ('foreground',)
  c.loss.weights = {'flow': 1.0, 'alpha': 1.0, 'restoration': 0.0}
  c.data.degradations = {}
  c.data.prompt_probs = {'box': 0.25, 'mask': 0.15, 'point': 0.15, 'text': 0.15,
                         'box+text': 0.15, 'point+text': 0.15}
  return c
