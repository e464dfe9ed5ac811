"""Reading and writing a training workdir's checkpoints (Orbax), shared by the trainer and
by inference, which reads them without the trainer: the train state (step, params, EMA,
optimizer state, key) with the Grain loader's state next to it, and the experiment config
the run recorded (`CONFIG`)."""

from __future__ import annotations

import shlex

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from layerjax.fileio import as_path, is_url


CONFIG = 'config.json'  # the experiment config, in the workdir: the last run's


def _not_read_only_notice(record) -> bool:
  """Orbax warns that a manager it was asked to open read-only is read-only."""
  return not record.getMessage().startswith('Given directory is read only')


def shapes(tree):
  """`tree`'s arrays as their shapes, dtypes and placements (a restore target that holds no
  memory); `jax.ShapeDtypeStruct`s pass as they are."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
  """Orbax `CheckpointManager` for the train state plus the Grain iterator's state."""

  def __init__(self, directory, keep: int, async_save: bool = True, read_only: bool = False):
    """`read_only`: for readers (inference), which must leave a running trainer's temporary
    folders and old steps alone."""
    directory = as_path(directory)  # a URL stays one: Orbax reaches stores through epath
    self.directory = directory if is_url(directory) else directory.absolute()
    writer = dict(read_only=True, create=False, max_to_keep=None, save_interval_steps=0) \
        if read_only else dict(max_to_keep=keep, cleanup_tmp_directories=True)
    if read_only:
      logging.get_absl_logger().addFilter(_not_read_only_notice)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save, **writer),
        item_names=('state', 'data'))

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: dict, iterator, *, wait: bool = False) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)),
        force=True)
    if wait:
      self.manager.wait_until_finished()

  def restore(self, step: int, state: dict, iterator=None, partial: bool = False) -> dict:
    """The state saved at `step` (shaped like `state`: arrays or `jax.ShapeDtypeStruct`s, whose
    shardings and dtypes the restored arrays take); also restores `iterator` if given.
    `partial`: `state` names some entries only (e.g. {'step', 'ema'}) and only those are read,
    so inference never holds the optimizer state. A step that cannot be read raises
    `UnreadableCheckpoint`, saying how to go back."""
    target = shapes(state)
    if partial:
      items = {'state': ocp.args.PyTreeRestore(
          target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)}
    else:
      items = {'state': ocp.args.StandardRestore(target)}
    if iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(iterator)
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))['state']
    except Exception as e:  # pylint: disable=broad-except  # whatever Orbax or Grain raise
      cause = e
      while cause.__cause__ or cause.__context__:
        cause = cause.__cause__ or cause.__context__
      folder = self.directory / str(step)
      earlier = [s for s in self.manager.all_steps() if s < step]
      back = f'step {max(earlier)}' if earlier else 'scratch'
      reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
      aside = shlex.join([*(['gcloud', 'storage'] if is_url(folder) else []), 'mv', str(folder),
                          f'{folder}.unreadable'])
      raise UnreadableCheckpoint(
          f'checkpoint step {step}: {folder} cannot be read ({reason}); if it is corrupt or '
          f'truncated, start from {back} by moving it aside: {aside}') from e

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class UnreadableCheckpoint(ValueError):
  pass
