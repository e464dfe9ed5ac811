"""Several processes joined by `jax.distributed` (local processes, fake CPU devices) train on
exactly the batches one process would, stop together when one of them is preempted, resume
exactly, and refuse to start unless they run the same code and config."""

import signal
import time

import jax
import numpy as np
import pytest

from layerjax import parallel
from layerjax.train import agreement, trainer
from train_utils import (ROOT, finish, launch_main, load_config_file, make_dataset,
                         restored_state)

# The demo config, shrunk: one transformer block, 32 px, a batch of 4.
SETTINGS = {'data.image_size': (32, 32), 'data.global_batch_size': 4, 'data.num_workers': 0,
            'log_every': 1, 'eval_every': 0, 'model.mmdit.num_layers': 1,
            'optimizer.decay_steps': 100, 'checkpoint_every': 1000}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return make_dataset(tmp_path_factory.mktemp('multiprocess_data'))


def demo_config(data_dir, **settings):
  c = load_config_file('liwi', 'demo')
  c.update_from_flattened_dict({**SETTINGS, 'data.data_dir': str(data_dir), **settings})
  return c


def launch(workdir, data_dir, devices: int, flags=((), ()), **settings) -> list:
  """`train_utils.launch_main` with the liwi demo config, `SETTINGS` and `settings`, as two
  processes with `devices` CPU devices each, `flags[i]` for process i."""
  settings = {**SETTINGS, 'data.data_dir': data_dir, **settings}
  return launch_main([f'--config={ROOT}/configs/liwi.py:demo',
                      *[f'--config.{k}={v}' for k, v in settings.items()]],
                     workdir, 2, devices, flags)


def losses(log: str, total: int) -> list[str]:
  return [line.split(' loss ')[1].split()[0] for line in log.splitlines()
          if ' loss ' in line and f'/{total} ' in line]


def saved_steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


def checkpoint(config, workdir, mesh):
  _, state, step = restored_state(config, workdir, mesh)
  return step, jax.tree.map(np.asarray, state)


@pytest.mark.slow
def test_two_processes_train_together(tmp_path, data_dir):
  """Two local processes (2 CPU devices each) joined by `jax.distributed` train 3 steps on
  one 4-device mesh: both log the same global losses and one checkpoint holds the state."""
  workdir = tmp_path / 'run'
  logs = finish(launch(workdir, data_dir, 2, total_steps=3, checkpoint_every=3))
  assert len(losses(logs[0], 3)) == 3, logs[0][-3000:]
  assert losses(logs[0], 3) == losses(logs[1], 3)
  for i, log in enumerate(logs):
    assert f'process {i}/2, 4 devices' in log, log[-3000:]
  assert (workdir / 'checkpoints' / '3').is_dir()


@pytest.mark.slow
def test_two_processes_train_on_one_process_batches_stop_together_and_resume_exactly(
    tmp_path, data_dir):
  """Two processes (2 devices each, the batch split over all 4). SIGTERM to process 1 only:
  both save the same step and exit 0. Resumed to a few steps further, the state equals that
  of an uninterrupted two-process run bitwise; and that run's losses are those of one process
  on the same 4-device mesh (the same examples and random draws in every global batch)."""
  cut = tmp_path / 'cut'
  procs = launch(cut, data_dir, 2, total_steps=500)
  deadline = time.time() + 400
  while 'step 3/500' not in procs[1][1].read_text() and time.time() < deadline:
    assert procs[1][0].poll() is None, procs[1][1].read_text()[-3000:]
    time.sleep(0.2)
  procs[1][0].send_signal(signal.SIGTERM)
  logs = finish(procs)
  stops = [[line.split('saved step ')[1].split(',')[0] for line in log.splitlines()
            if 'SIGTERM: saved step' in line] for log in logs]
  assert len(stops[0]) == 1 and stops[0] == stops[1], logs[1][-3000:]
  stop = int(stops[0][0])
  assert 3 <= stop < 500 and saved_steps(cut) == [stop]

  total = stop + 2
  finish(launch(cut, data_dir, 2, total_steps=total))
  straight = tmp_path / 'straight'
  logs = finish(launch(straight, data_dir, 2, total_steps=total))
  assert len(losses(logs[0], total)) == total and losses(logs[0], total) == losses(logs[1], total)

  one = tmp_path / 'one'
  mesh = parallel.make_mesh((4, 1, 1), jax.devices()[:4])
  config = demo_config(data_dir, total_steps=total)
  result = trainer.train(config, one, mesh=mesh)
  two = (straight / 'train_result.json').read_text()
  assert result['train']['loss'] == pytest.approx(float(two.split('"loss": ')[1].split(',')[0]),
                                                  rel=1e-5)
  (s1, a), (s2, b) = checkpoint(config, straight, mesh), checkpoint(config, cut, mesh)
  assert s1 == s2 == total
  for (path, x), y in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_tensor_axis_across_processes_gives_the_one_process_loss(tmp_path, data_dir):
  """mesh (1, 1, 2) over two processes of one device each: both hold every row, so both load
  the whole batch, and both log the loss one process logs on the same mesh."""
  logs = finish(launch(tmp_path / 'two', data_dir, 1, total_steps=2, mesh=(1, 1, 2)))
  assert len(losses(logs[0], 2)) == 2 and losses(logs[0], 2) == losses(logs[1], 2)
  config = demo_config(data_dir, total_steps=2, mesh=(1, 1, 2))
  result = trainer.train(config, tmp_path / 'one',
                         mesh=parallel.make_mesh((1, 1, 2), jax.devices()[:2]))
  assert losses(logs[0], 2)[-1] == f'{result["train"]["loss"]:.4f}'


def test_processes_with_other_configs_refuse_to_start(tmp_path, data_dir):
  """Process 1 given another seed: both stop before any work, with one line naming it."""
  workdir = tmp_path / 'run'
  logs = finish(launch(workdir, data_dir, 1, [[], ['--config.seed=1']], total_steps=2),
                codes=(2,))
  for log in logs:
    errors = [line for line in log.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1, log[-3000:]
    assert errors[0].startswith('error: the 2 processes disagree: config differs from process '
                                '0 (') and 'on process 1: ' in errors[0], errors
    assert 'code differs' not in errors[0]
  assert not (workdir / 'checkpoints').exists()


def test_disagreement_names_the_processes_that_differ():
  table = np.zeros((3, 2, 32), np.uint8)  # [process, (code, config), sha256]
  assert agreement.disagreement(table) is None
  table[2, 0, 0] = 0xab  # process 2 runs other code
  table[1, 1, 31] = 1   # process 1 has another config (in its last byte: not shown)
  assert agreement.disagreement(table) == (
      'the 3 processes disagree: code differs from process 0 (000000000000) on process 2: '
      'ab0000000000: install the same commit on every worker; config differs from process 0 '
      '(000000000000) on process 1: 000000000000: pass the same config and flags to every '
      'process (code: sha256 of the layerjax sources; config: sha256 of the resolved config)')


def test_code_digest_follows_every_source_file(tmp_path):
  (tmp_path / 'pkg' / 'sub').mkdir(parents=True)
  (tmp_path / 'pkg' / 'a.py').write_text('x = 1\n')
  (tmp_path / 'pkg' / 'sub' / 'b.py').write_text('y = 2\n')
  (tmp_path / 'pkg' / 'notes.txt').write_text('not code')
  first = agreement.code_digest(tmp_path / 'pkg')
  (tmp_path / 'pkg' / 'notes.txt').write_text('changed')
  assert agreement.code_digest(tmp_path / 'pkg') == first
  (tmp_path / 'pkg' / 'sub' / 'b.py').write_text('y = 3\n')
  assert agreement.code_digest(tmp_path / 'pkg') != first
  (tmp_path / 'pkg' / 'sub' / 'b.py').write_text('y = 2\n')
  (tmp_path / 'pkg' / 'sub' / 'b.py').rename(tmp_path / 'pkg' / 'b2.py')
  assert agreement.code_digest(tmp_path / 'pkg') != first
