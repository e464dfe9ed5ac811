"""Metric writers with CLU's `MetricWriter` interface (write_scalars / write_images /
write_hparams / flush / close): the console through absl logging, TensorBoard event files
through tensorboardX.

CLU's own `clu.metric_writers` cannot be imported without TensorFlow (its package
`__init__` imports the TF summary writer), which this project does not install.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from absl import logging


class ConsoleWriter:

  def write_scalars(self, step: int, scalars: dict) -> None:
    logging.info('[%d] %s', step, ', '.join(f'{k}={v:.4g}' for k, v in sorted(scalars.items())))

  def write_images(self, step: int, images: dict) -> None:
    logging.info('[%d] images: %s', step, ', '.join(f'{k} {np.shape(v)}' for k, v in images.items()))

  def write_hparams(self, hparams: dict) -> None:
    logging.info('hparams: %s', hparams)

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class TensorBoardWriter:

  def __init__(self, logdir: Path):
    import tensorboardX
    self._writer = tensorboardX.SummaryWriter(str(logdir))

  def write_scalars(self, step: int, scalars: dict) -> None:
    for k, v in scalars.items():
      self._writer.add_scalar(k, float(v), step)

  def write_images(self, step: int, images: dict) -> None:
    for k, v in images.items():
      self._writer.add_image(k, np.asarray(v), step, dataformats='HWC')

  def write_hparams(self, hparams: dict) -> None:
    self._writer.add_text('hparams', '\n'.join(f'    {k}: {v}' for k, v in sorted(hparams.items())))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class MultiWriter:

  def __init__(self, writers):
    self.writers = list(writers)

  def __getattr__(self, name):
    def call(*args, **kw):
      for w in self.writers:
        getattr(w, name)(*args, **kw)
    return call


def create_writer(logdir: Path, enabled: bool = True) -> MultiWriter:
  """Console + TensorBoard on the writing process (process 0); a silent writer elsewhere."""
  return MultiWriter([ConsoleWriter(), TensorBoardWriter(logdir)] if enabled else [])
