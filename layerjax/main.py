"""The main job: train or evaluate a layer decomposer, or finetune one with judge rewards
(a config with a `reasonx` section, `configs/reasonx.py`).

    python -m layerjax.main --config=configs/liwi.py:demo --workdir=out/run [--mode=train|eval]
        [--config.total_steps=100 ...] [--distributed | --coordinator_address=HOST:PORT
        --num_processes=N --process_id=I]

The workdir holds `checkpoints/` (Orbax; a rerun resumes), `tensorboard/`, `eval/*.json`
and `samples/*.png`; `--mode=eval` with other `eval` keys than the run's writes beside the
run's evaluation (`eval/test_900.seed=3.json`), not over it. `--distributed` initialises
multi-host JAX from the environment (Cloud TPU pods, Slurm); the explicit coordinator flags
serve several processes on one machine.
The config is checked before anything else; an error is one line on stderr (exit 2 for a
bad flag or config), with the traceback at `-v 1`. The terminal shows progress and results;
every log line, the libraries' included, goes to `log.txt` in a local workdir (process i > 0:
`log.<i>.txt`). The command restarts itself once, with the host settings of
`layerjax/host.py` (huge pages for the allocator, XLA:CPU's memory-aware scheduler).
"""

from __future__ import annotations

import json

import jax
from absl import flags, logging

from layerjax import cli, host

_CONFIG = cli.define_config_file(None, 'experiment config file[:arg]', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'where checkpoints, logs and results go')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'train, or evaluate the latest '
                          'checkpoint')
_SPLIT = flags.DEFINE_string('split', None, 'eval split (default: config.eval.split)')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False,
                                 'jax.distributed.initialize() from the environment')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'processes in the job')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'this process, 0..num_processes-1')

flags.mark_flags_as_required(['config', 'workdir'])


def initialize_distributed() -> None:
  if _COORDINATOR.value is not None:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
      raise cli.UsageError('--coordinator_address needs --num_processes and --process_id')
    # CPU processes (tests, laptops) need a collectives backend; GPUs and TPUs ignore it.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()


def main(argv) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  from layerjax.train import config as train_config
  if 'reasonx' in config:  # reward finetuning: the start model's config with this file's keys
    from layerjax.train import reasonx
    config = reasonx.full_config(config)
    reasonx.check(config)
  else:
    train_config.check(config)  # before distributed initialisation, on every process alike
  initialize_distributed()
  from layerjax.train import evaluate, trainer  # after distributed initialisation
  i = jax.process_index()
  cli.log_file(f'{_WORKDIR.value}/log{f".{i}" if i else ""}.txt')
  logging.info('process %d/%d, %d devices (%s)', jax.process_index(), jax.process_count(),
               jax.device_count(), jax.default_backend())
  if _MODE.value == 'train' and 'reasonx' in config:
    result = reasonx.finetune(config, _WORKDIR.value)
  elif _MODE.value == 'train':
    result = trainer.train(config, _WORKDIR.value)
  else:
    setup, state, step = trainer.restore_for_eval(config, _WORKDIR.value)
    result = evaluate.Evaluation(setup, config).run(
        state, _SPLIT.value or config.eval.split, _WORKDIR.value, step,
        name_suffix=evaluate.name_suffix(config, _WORKDIR.value))
    print(evaluate.table(result))
  if jax.process_index() == 0:
    print(json.dumps(result, indent=2, default=float))


if __name__ == '__main__':
  host.reexec()
  cli.run_absl(main)
