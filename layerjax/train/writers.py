"""Metric writers with CLU's `MetricWriter` interface (write_scalars / write_images /
write_hparams / flush / close): the console through absl logging, TensorBoard event files
through tensorboardX; `read_scalars` reads the event files back.

CLU's own `clu.metric_writers` cannot be imported without TensorFlow (its package
`__init__` imports the TF summary writer), which this project does not install.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import logging

from layerjax.cli import DETAIL
from layerjax.fileio import as_path, atomic_file, is_url


class ConsoleWriter:
  """Every value into the log (the run's log file; the terminal at -v 1): the trainer prints
  its own short progress and result lines."""

  def write_scalars(self, step: int, scalars: dict) -> None:
    logging.info('[%d] %s', step, ', '.join(f'{k}={v:.4g}' for k, v in sorted(scalars.items())),
                 extra=DETAIL)

  def write_images(self, step: int, images: dict) -> None:
    logging.info('[%d] images: %s', step,
                 ', '.join(f'{k} {np.shape(v)}' for k, v in images.items()), extra=DETAIL)

  def write_hparams(self, hparams: dict) -> None:
    logging.info('hparams: %s', hparams, extra=DETAIL)

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class TensorBoardWriter:
  """TensorBoard events in `logdir`. For a URL (`gs://...`) the events go to a local staging
  folder whose files are uploaded whole (each object replaced in one write) at `flush`, at
  `close`, and after a write once `upload_every` seconds have passed since the last upload:
  tensorboardX alone reaches GCS only through TensorFlow or google-cloud-storage and appends
  to the object, which a store cannot do."""

  def __init__(self, logdir, upload_every: float = 60.0):
    import tensorboardX
    self._remote = as_path(logdir) if is_url(logdir) else None
    self._staging = tempfile.mkdtemp(prefix='tensorboard-') if self._remote else None
    self._writer = tensorboardX.SummaryWriter(self._staging or str(logdir))
    self._upload_every, self._uploaded = upload_every, time.monotonic()

  def write_scalars(self, step: int, scalars: dict) -> None:
    for k, v in scalars.items():
      self._writer.add_scalar(k, float(v), step)
    self._upload_when_due()

  def write_images(self, step: int, images: dict) -> None:
    for k, v in images.items():
      self._writer.add_image(k, np.asarray(v), step, dataformats='HWC')
    self._upload_when_due()

  def write_hparams(self, hparams: dict) -> None:
    self._writer.add_text('hparams', '\n'.join(f'    {k}: {v}' for k, v in sorted(hparams.items())))

  def flush(self) -> None:
    self._writer.flush()
    self._upload()

  def close(self) -> None:
    self._writer.close()
    self._upload()
    if self._staging:
      shutil.rmtree(self._staging, ignore_errors=True)

  def _upload_when_due(self) -> None:
    if self._remote and time.monotonic() - self._uploaded >= self._upload_every:
      self.flush()

  def _upload(self) -> None:
    if not self._remote:
      return
    for path in sorted(Path(self._staging).iterdir()):
      with atomic_file(self._remote / path.name) as tmp:
        shutil.copyfile(path, tmp)
    self._uploaded = time.monotonic()


def read_scalars(logdir) -> dict[str, dict[str, dict[int, float]]]:
  """{event file name: {tag: {step: value}}} of the TensorBoard event files in `logdir` (a
  path or URL), without TensorBoard: what a notebook shows where it cannot run TensorBoard.
  Each record is its length (8 bytes), the length's CRC (4), an `Event` proto, its CRC (4)."""
  from tensorboardX.proto import event_pb2
  files = {}
  for path in sorted(as_path(logdir).glob('events.out.tfevents.*')):
    data, i, scalars = path.read_bytes(), 0, {}
    while i + 12 <= len(data):
      (n,) = struct.unpack('<Q', data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for value in event.summary.value:
        if value.HasField('simple_value'):
          scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    files[path.name] = scalars
  return files


class MultiWriter:

  def __init__(self, writers):
    self.writers = list(writers)

  def __getattr__(self, name):
    def call(*args, **kw):
      for w in self.writers:
        getattr(w, name)(*args, **kw)
    return call


def create_writer(logdir, enabled: bool = True) -> MultiWriter:
  """Console + TensorBoard on the writing process (process 0); a silent writer elsewhere."""
  return MultiWriter([ConsoleWriter(), TensorBoardWriter(logdir)] if enabled else [])
