"""Tiny experiment configs and datasets for the training tests (built from configs/liwi.py)."""

import contextlib
import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache
from safetensors.numpy import save_file

from layerjax.data import schema
from layerjax.data.tfds_builder import Layered
from layerjax.models.shared import TextEmbeddings
from test_schema import make_sample

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
  """A TCP port on this machine that nothing listens on now (for a coordinator or a server)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def one_device(config) -> jax.sharding.Mesh:
  """`config`'s mesh on the first device alone. For an in-process run that needs no
  sharding: over the session's 8 fake devices, Orbax's saves slice every array per replica,
  each slice shape compiled eagerly (29 of test_gcs's stop/resume test's 123 s), and the
  steps run slower."""
  from layerjax.train import trainer
  return trainer.config_mesh(config, jax.devices()[:1])


def devices_env(devices: int) -> dict:
  """`os.environ` for a subprocess with `devices` CPU devices, the session's other XLA flags
  (conftest's) kept."""
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', os.environ.get('XLA_FLAGS', ''))
  return {**os.environ,
          'XLA_FLAGS': f'{flags.strip()} --xla_force_host_platform_device_count={devices}'.strip()}


def launch_main(args: list[str], workdir: Path, processes: int, devices: int,
                flags=None) -> list:
  """Starts `python -m layerjax.main --workdir=WORKDIR ARGS` as `processes` local processes
  (joined by `jax.distributed` when several) with `devices` CPU devices each, `flags[i]` added
  for process i; returns (process, log file) pairs, the logs beside the workdir."""
  command = [sys.executable, '-m', 'layerjax.main', f'--workdir={workdir}', *args]
  if processes > 1:
    command += [f'--coordinator_address=localhost:{free_port()}', f'--num_processes={processes}']
  env = devices_env(devices)
  out = []
  for i in range(processes):
    log = workdir.parent / f'{workdir.name}.{i}.log'
    own = [f'--process_id={i}'] if processes > 1 else []
    with open(log, 'a') as f:
      out.append((subprocess.Popen(command + own + list(flags[i] if flags else ()), cwd=ROOT,
                                   env=env, stdout=f, stderr=subprocess.STDOUT), log))
  return out


def finish(procs, codes=(0,)) -> list[str]:
  """Waits for `launch_main`'s processes; their logs (each ending with its exit code
  checked)."""
  logs = []
  for proc, log in procs:
    proc.wait(timeout=600)
    logs.append(log.read_text())
    assert proc.returncode in codes, logs[-1][-3000:]
  return logs


@contextlib.contextmanager
def persistent_compile_cache(folder: Path):
  """JAX's persistent compilation cache in `folder`, every program kept, while the context
  is open: runs in one process that compile the same programs compile them once."""
  keys = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
          'jax_persistent_cache_min_entry_size_bytes')
  saved = {k: getattr(jax.config, k) for k in keys}
  for k, v in zip(keys, (str(folder), 0, 0)):
    jax.config.update(k, v)
  # JAX decides whether to use the cache at a process's first compile and keeps to it.
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    for k, v in saved.items():
      jax.config.update(k, v)
    compilation_cache.reset_cache()


def load_config_file(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def make_dataset(root: Path, n: int = 8, size: int = 32) -> Path:
  """`n` samples (a disc and its shadow over a gradient) in train and validation splits."""
  for s in range(n):
    schema.write_folder(make_sample(h=size, w=size, seed=s), root / 'src' / f'{s}')
  folders = sorted((root / 'src').iterdir())
  Layered(data_dir=root / 'tfds', sources={'train': folders[:n - 2],
                                           'validation': folders[n - 2:]}).download_and_prepare()
  return root / 'tfds'


TEXTS = ('', 'ball', 'a ball', 'the ball on the right')


def write_embeddings(path: Path, tokens: int, dim: int, pooled: int) -> Path:
  """Random 'precomputed SD3 embeddings' for every text the test samples can produce."""
  rng = np.random.default_rng(0)
  tensors = {}
  for text in TEXTS:
    k = TextEmbeddings.key(text)
    tensors[f'{k}.states'] = rng.normal(size=(tokens, dim)).astype(np.float32)
    tensors[f'{k}.pooled'] = rng.normal(size=(pooled,)).astype(np.float32)
  save_file(tensors, str(path))
  return path


def tiny(data_dir, kind: str = 'pixels', embeddings=None, **top):
  """configs/liwi.py:demo shrunk to a 32 px, 2-block model; kind 'vae' uses SD3's structure
  (a tiny random VAE, VAE-decoder heads, precomputed text embeddings)."""
  c = load_config_file('liwi', 'demo')
  c.data.data_dir = str(data_dir)
  c.data.image_size = (32, 32)
  c.data.global_batch_size = 8
  c.data.num_workers = 0
  c.data.point_sigma = 2.0
  c.data.prompt_probs = {'box': 0.5, 'mask+text': 0.5}
  c.model.mmdit = dict(sample_size=8, patch_size=2, num_layers=2, attention_head_dim=8,
                       num_attention_heads=4, joint_attention_dim=16, caption_projection_dim=32,
                       pooled_projection_dim=16, pos_embed_max_size=16,
                       dual_attention_layers=(0,), qk_norm='rms_norm')
  c.model.text = {'encoder': 'bytes', 'embeddings': '', 'max_len': 16, 'width': 16, 'depth': 1,
                  'heads': 2}
  c.model.head = {'kind': 'conv', 'width': 8}
  if kind == 'vae':
    c.model.latents = {'kind': 'vae', 'vae': {'block_out_channels': (8, 8), 'latent_channels': 4,
                                              'norm_num_groups': 4, 'layers_per_block': 1,
                                              'sample_size': 32}}
    c.model.head = {'kind': 'vae_decoder'}
    c.model.conditions = ('image', 'prompt')  # as the SD3 configs
    c.model.prediction, c.model.long_skip = 'velocity', False  # as SD3 itself
    c.model.text = {'encoder': 'precomputed', 'embeddings': str(embeddings), 'max_len': 16,
                    'width': 16, 'depth': 1, 'heads': 2}
  c.total_steps = c.optimizer.decay_steps = 4
  c.optimizer.warmup_steps = 2
  c.log_every = 2
  c.eval_every = 0
  c.checkpoint_every = 2
  c.async_checkpoints = True
  c.eval.batch_per_device = 1  # 8 examples on the tests' 8 fake devices
  c.eval.num_batches = 1
  c.eval.sample_steps = 2
  c.eval.grid_rows = 2
  for k, v in top.items():
    c[k] = v
  return c


def restored_state(config, workdir, mesh=None):
  """`workdir`'s latest checkpoint whole (parameters, EMA, optimizer state), restored into
  the state a run of `config` makes, as a resumed run reads it: (setup, state, step)."""
  from layerjax import checkpoints, fileio
  from layerjax.train import trainer
  setup = trainer.create(config, mesh)
  ckpt = checkpoints.Checkpoints(fileio.as_path(workdir) / 'checkpoints',
                                 config.keep_checkpoints, async_save=False, read_only=True)
  step = ckpt.latest()
  state = ckpt.restore(step, setup.state)
  ckpt.close()
  return setup, state, step


def random_model(config, seed: int = 1, std: float = 0.05):
  """`config`'s decomposer with every parameter moved by N(0, std^2) noise: a fresh model's
  zero-initialised blocks ignore most of their inputs (the prompt, the text). Drawn with
  numpy: a JAX draw per parameter shape would compile for each."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from layerjax import build
  model = build.build_model(config, 0)
  leaves, tree = jax.tree.flatten(nnx.state(model, nnx.Param))
  r = np.random.default_rng(seed)
  nnx.update(model, jax.tree.unflatten(tree, [
      jnp.asarray(p + std * r.normal(size=p.shape).astype(p.dtype)) for p in leaves]))
  return model
