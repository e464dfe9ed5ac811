"""The engine's two jobs as runner work functions: decompose photos, synthesise scenes.

`make_*` return picklable factories (`functools.partial`) that each worker calls once to
build its tools, then the per-input function `key -> Result`.
"""

from __future__ import annotations

import functools
from pathlib import Path

from data_engine import core, stages, synthesis
from data_engine.core import Decision, Drop
from data_engine.runners import Result

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
