"""The data engine (ADD) configs: `python -m data_engine ... --config configs/engine.py:VARIANT`.

Variants:
  offline   every tool and agent runs here without weights (the default engine)
  fast      offline, with cheaper tools (Telea inpainting, KNN matting, no shadows) for
            quick looks and tests
"""

from data_engine.config import default_config


def get_config(arg: str = 'offline'):
  config = default_config()
  if arg == 'offline':
    return config
  if arg == 'fast':
    config.tools.matting = {'name': 'knn'}
    config.decompose.shadows = False
    config.decompose.max_side = 256
    return config
  raise ValueError(f'configs/engine.py: unknown variant {arg!r} (offline, fast)')
