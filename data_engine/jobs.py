"""The engine's jobs: decompose photos and synthesise scenes (as runner work functions), and
build the TFDS dataset of an output's samples.

`make_*` return picklable factories (`functools.partial`) that each worker calls once to
build its tools, then the per-input function `key -> Result`; `*_fingerprint` return the
runner's `fingerprint(key)`: what the key's output depends on (its photo or the bank, and
the config), so a re-run redoes exactly the inputs whose output would differ.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from data_engine import core, stages, synthesis
from data_engine.core import Decision, Drop
from data_engine.runners import Result
from layerjax.data import schema
from layerjax.fileio import fingerprint, tree_stats

PHOTO_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.tif', '.tiff')


def list_photos(root: Path, exclude: Path | None = None) -> list[str]:
  """The photos under `root`, sorted; none from `exclude` (an output folder inside it)."""
  root = Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f'{root}: no such directory of photos')
  skip = Path(exclude).resolve() if exclude else None
  return sorted(str(p) for p in root.rglob('*')
                if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file()
                and not (skip and p.resolve().is_relative_to(skip)))


def _decompose_work(config, root: str):
  ctx = stages.Context(config)

  def work(key: str) -> Result:
    path = Path(key)
    item = stages.Photo(stages.sample_id(path, Path(root)), path.relative_to(root).as_posix(),
                        str(path))
    sample, record = stages.run(item, ctx)
    return Result(key, [sample] if sample else [], [d.to_json() for d in record],
                  None if sample else f'{record[-1].stage}: {record[-1].reason}')
  return work


def config_fingerprint(config) -> str:
  """The config's outputs depend on: all of it but the runner (workers, Beam options and
  dataset splits change how, not what)."""
  return fingerprint({k: v for k, v in config.to_dict().items() if k != 'runner'})


def photo_fingerprint(base: str, root):
  """key -> the fingerprint of `base` (what the outputs depend on besides the photo) and
  the photo at `key` under `root`: its path there, size and modification time."""
  def of(key: str) -> str:
    st = os.stat(key)
    return fingerprint(base, Path(key).relative_to(root).as_posix(), st.st_size,
                       st.st_mtime_ns)
  return of


def decompose_fingerprint(config, root):
  return photo_fingerprint(config_fingerprint(config), root)


def synthesize_fingerprint(config, bank_path):
  fp = fingerprint(config_fingerprint(config), tree_stats(bank_path))
  return lambda key: fp


def make_decompose(config, root) -> functools.partial:
  return functools.partial(_decompose_work, config, str(root))


def _synthesize_work(config, bank_path: str):
  bank = synthesis.load_bank(bank_path)
  agent = core.create('agent', config.agent)
  captioner = stages.build_tool('captioner', config.tools.captioner, agent)

  def work(key: str) -> Result:
    record = []
    with core.Timer() as t:
      try:
        try:
          sample = synthesis.synthesize(bank, int(key), config.synthesize)
        except (ValueError, OSError) as e:  # e.g. a bank image that no longer decodes
          raise Drop('bad_asset', str(e)) from None
        stages.caption_objects(sample.layers, lambda lay: core.call_tool(
            'captioner', lambda: captioner(lay.rgba, lay.label), config.tool_timeout))
        checks = stages.check_texts(sample.layers, agent.check_text)
        # The agent's decisions travel with the sample, as they do for decompositions.
        sample.provenance['engine'] = stages.jsonable({
            'text_checks': checks, 'agent': config.agent.to_dict(),
            'prompt_versions': agent.prompt_versions()})
        sample.validate()
        objects = sum(l.kind == 'object' for l in sample.layers)
        decision = Decision('synthesize', True, '', {'objects': objects})
      except Drop as drop:
        sample, decision = None, Decision('synthesize', False, drop.reason,
                                          {'detail': drop.detail})
    decision.seconds = round(t.seconds, 4)
    record.append(decision.to_json())
    return Result(key, [sample] if sample else [], record,
                  None if sample else f'synthesize: {decision.reason}')
  return work


def make_synthesize(config, bank_path) -> functools.partial:
  return functools.partial(_synthesize_work, config, str(bank_path))


def scene_keys(start: int, num: int) -> list[str]:
  return [f'{i:08d}' for i in range(start, start + num)]


def split_of(sample_id: str, fractions: dict) -> str:
  """A stable split for a sample: its id's hash against the cumulative fractions."""
  u = int(hashlib.sha256(sample_id.encode()).hexdigest()[:12], 16) / 16**12
  total, acc = sum(fractions.values()), 0.0
  for split, frac in fractions.items():
    acc += frac / total
    if u < acc:
      return split
  return split


def build_tfds(output: Path, data_dir: Path, fractions: dict, on_error: str,
               overwrite: bool = False) -> dict:
  """The samples of an engine output as the TFDS dataset, rebuilt only when they (or the
  options) changed since the last build (`tfds_builder.build`)."""
  from layerjax.data.tfds_builder import build
  folders = schema.sample_folders(Path(output) / 'samples')
  sources: dict[str, list[Path]] = {}
  for folder in folders:
    sources.setdefault(split_of(folder.name, fractions), []).append(folder)
  if not sources:
    raise ValueError(f'{output}/samples: no samples to build a dataset from')
  return build(sources, data_dir, on_error=on_error, overwrite=overwrite)
