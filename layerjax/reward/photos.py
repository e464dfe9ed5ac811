"""Unlabelled photos and the prompts the engine's detector proposes for them: what reward
finetuning decomposes.

    stream = photo_stream(spec, config, seed)   # a checkpointable Grain iterable
    for photo in stream: ...                     # a `Photo`, or why it was skipped (a str)

`spec` names the source: a local folder of photos ('out/photos': every image file under it,
`data_engine.jobs.list_photos`), or 'tfds:SPLIT', a split of the experiment's layered TFDS
dataset (`data.name` in `data.data_dir`), whose scenes also carry their ground truth (for the
offline judge; a model never sees it). Each visit of a photo runs the detector
(`infer.scene.Proposals`: the engine's offline saliency boxes by default) and picks one of its
boxes at random as the prompt (or, for a TFDS source, one of the scene's own prompt boxes,
`reasonx.prompts='dataset'`). On a scene with ground truth the box is matched to the scene's
object whose prompt box it overlaps most (IoU >= `MATCH_IOU`), so the judge knows which object
the prompt refers to.

A visit yields the reason instead of a `Photo` when the photo cannot be read ('unreadable'),
the detector finds nothing ('no_prompt') or the box matches no object of the ground truth
('no_referent'): the consumer counts and skips it (so a count follows the iterator's
checkpointed position, not what a prefetching thread read ahead); it never stops a run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grain
import numpy as np

from layerjax.data import images
from layerjax.data.pipeline import tfds_split
from layerjax.data.schema import LayeredSample
from layerjax.infer.scene import Proposals, box_iou

MATCH_IOU = 0.5  # a detection refers to a ground-truth object it overlaps at least this much
TFDS = 'tfds:'


@dataclasses.dataclass
class Photo:
  """One photo and one prompt for it."""
  key: str                           # where it came from: the file, or 'SPLIT/ID'
  image: np.ndarray                  # [H, W, 3] float32 in [0, 1]
  box: tuple[int, int, int, int]     # the prompt: (x0, y0, x1, y1) pixels, end-exclusive
  target: str                        # the referred object's layer name (the truth's, if any)
  label: str                         # what a judge calls the object
  truth: LayeredSample | None = None


def referent(truth: LayeredSample, box) -> str | None:
  """The object of `truth` whose prompt box (its bbox if it has no prompt) overlaps `box`
  most, if at least `MATCH_IOU`."""
  boxes = {l.name: l.bbox for l in truth.layers if l.kind == 'object' and l.bbox}
  boxes.update({p.target: p.box for p in truth.prompts if p.box is not None})
  scored = [(box_iou(b, box), name) for name, b in boxes.items()]
  best = max(scored, default=(0.0, None))
  return best[1] if best[0] >= MATCH_IOU else None


def label_of(layer) -> str:
  """What a judge calls a scene's object: its first referring expression, else 'the' and its
  label; '' without either."""
  if layer.referring:
    return layer.referring[0]
  return f'the {layer.label}' if layer.label else ''


def check_spec(spec: str, config) -> None:
  """A source that does not exist is a config error, found before the run starts."""
  if not isinstance(spec, str) or not spec:
    raise ValueError(f'reasonx photos: expected a folder or {TFDS}SPLIT, got {spec!r}')
  if spec.startswith(TFDS):
    tfds_split(config.data.name, config.data.data_dir, spec[len(TFDS):])
    return
  from data_engine import jobs
  if not Path(spec).is_dir():
    raise FileNotFoundError(f'reasonx photos: {spec}: no such folder')
  if not jobs.list_photos(Path(spec)):
    raise FileNotFoundError(f'reasonx photos: {spec}: no photos '
                            f'({", ".join(jobs.PHOTO_SUFFIXES)})')


class _Visit:
  """Grain's random map: a record -> a `Photo`, or the reason it is skipped."""

  def __init__(self, spec: str, proposals):
    self.spec, self.proposals = spec, proposals  # proposals None: the dataset's own boxes

  def __call__(self, record, rng: np.random.Generator) -> Photo | str:
    truth = None
    if self.spec.startswith(TFDS):
      from layerjax.data.tfds_builder import from_example
      truth = from_example(record)
      key, image = f'{self.spec[len(TFDS):]}/{truth.id}', truth.image
    else:
      key = str(Path(record).relative_to(self.spec))  # `list_photos` gives paths under it
      try:
        image = images.load_image(record, alpha='composite')
      except images.ImageError:
        return 'unreadable'
    if self.proposals is None:
      boxes = [(p.box, p.target, '') for p in truth.prompts if p.box is not None]
    else:
      boxes = [(d.box, None, d.label) for d in self.proposals(image)[0]]
    if not boxes:
      return 'no_prompt'
    box, target, detected = boxes[rng.integers(len(boxes))]
    if target is None:
      target = 'object' if truth is None else referent(truth, box)
    if target is None:
      return 'no_referent'
    label = label_of(truth.layer(target)) if truth is not None else ''
    label = label or (f'the {detected}' if detected else 'the object')
    return Photo(key, image, tuple(int(v) for v in box), target, label, truth)


def photo_stream(spec: str, config, seed: int, proposals=None, shard: int = 0,
                 shards: int = 1, prefetch: int = 0) -> grain.IterDataset:
  """The photos of `spec`, shuffled and repeated forever, each visit with its own prompt
  or the reason it has none: every `shards`-th visit from `shard` (a process's share; a
  visit's prompt follows its place in the whole stream, whatever the share). `proposals`: an
  `infer.scene.Proposals` (default: the engine's offline detector). `prefetch`: visits one
  background thread prepares ahead (0: none, each visit when asked for; Grain's default,
  16 threads 500 visits ahead, would run the detector on hundreds of
  photos a step never reaches)."""
  check_spec(spec, config)
  if spec.startswith(TFDS):
    source = tfds_split(config.data.name, config.data.data_dir, spec[len(TFDS):])
  else:
    from data_engine import jobs
    source = jobs.list_photos(Path(spec))
  if proposals == 'dataset' and not spec.startswith(TFDS):
    raise ValueError(f'reasonx photos: {spec}: a folder has no prompts of its own; use the '
                     'detector')
  proposals = Proposals() if proposals is None else proposals
  visit = _Visit(spec, None if proposals == 'dataset' else proposals)
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  ds = ds.random_map(visit, seed=seed)[shard::shards]  # lazy: only this share is visited
  options = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
  return ds.to_iter_dataset(options)
