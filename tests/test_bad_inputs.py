"""The catalogue of bad inputs: each gets one `error: ...` line on stderr naming the file or
key and the problem, before any work, with a non-zero exit code (2 for bad input).

Sections: training configs, engine configs, command lines (arguments, output paths that are
files, a full disk, --verbose), the absl app, checkpoints, dataset shards, the NaN stop,
non-finite weights in conversions.
"""

import errno
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from data_engine import config as engine_config
from data_engine.__main__ import main as engine_main
from layerjax import checkpoints, cli, config_spec, parallel
from layerjax.convert import __main__ as convert_main
from layerjax.convert import checkpoint, diffusers
from layerjax.convert.files import WEIGHTS
from layerjax.data import pipeline
from layerjax.data.importers.__main__ import main as importers_main
from layerjax.models import mmdit
from layerjax.train import config as train_config
from layerjax.train import trainer
from test_importers_cli import crello_file
from train_utils import ROOT, devices_env, load_config_file, make_dataset, tiny

ConfigError = config_spec.ConfigError


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return make_dataset(tmp_path_factory.mktemp('bad_inputs_data'), n=4)


def one_error_line(capsys) -> str:
  """The single line a CLI printed on stderr, without 'error: '."""
  err = capsys.readouterr().err
  lines = err.splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), err
  return lines[0].removeprefix('error: ')


# --- training configs ---------------------------------------------------------------------

def _set(config, key: str, value):
  """`config` with `key` set to `value`, whatever its type (as a config file may do)."""
  *parents, leaf = key.split('.')
  node = config
  for part in parents:
    node = node[part]
  with node.ignore_type():
    node[leaf] = value
  return config


def test_shipped_configs_pass():
  for name, arg in (('liwi', 'demo'), ('reflayer', 'demo')):
    train_config.check(load_config_file(name, arg))


@pytest.mark.parametrize('key,value,message', [
    ('keep_checkpoints', 0, 'keep_checkpoints: expected an int >= 1, got 0'),
    ('total_steps', 'abc', "total_steps: expected an int >= 1, got 'abc'"),
    ('log_every', 1.5, 'log_every: expected an int >= 1, got 1.5'),
    ('async_checkpoints', 'yes', "async_checkpoints: expected True or False, got 'yes'"),
    ('mesh', (0, 1, 1), r'mesh: mesh shape \(0, 1, 1\) must give 3 sizes'),
    ('mesh', (-1, -1, 1), r'mesh: mesh shape \(-1, -1, 1\) must give'),
    ('ema_decay', 1.5, r'ema_decay: expected a number in \[0, 1\], got 1.5'),
    ('data.hflip_prob', -0.1, r'data.hflip_prob: expected a number in \[0, 1\]'),
    # tiny(): 4x4 pixel blocks per latent, 2x2 latents per token: 8 pixels
    ('data.image_size', (36, 32), r'data.image_size: \(36, 32\) must be divisible by latent '
                                  r'factor x patch size = 8'),
    ('data.image_size', (32,), r'data.image_size: expected a sequence of 2, got \(32,\)'),
    ('data.global_batch_size', 0, 'data.global_batch_size: expected an int >= 1'),
    ('data.num_workers', -1, 'data.num_workers: expected an int >= 0'),
    ('data.scale_range', (1.2, 1.1), r'data.scale_range: expected an ordered pair'),
    ('data.degradations', {'blur': {'prob': 2.0, 'strength': (1, 2)}},
     r'data.degradations.blur.prob: expected a number in \[0, 1\], got 2.0'),
    ('data.degradations', {'blurr': {'prob': 0.5, 'strength': (1, 2)}},
     "data.degradations: unknown key 'blurr' \\(did you mean 'blur'\\?\\)"),
    ('data.prompt_probs', {'box': 0.0}, 'data.prompt_probs: some kind needs a positive'),
    ('model.head', {'kind': 'cnv', 'width': 8},
     "model.head.kind: 'cnv' is not one of \\['conv', 'vae_decoder'\\]; did you mean 'conv'"),
    ('model.dtype', 'float64', "model.dtype: 'float64' is not one of"),
    ('model.prediction', 'noise', "model.prediction: 'noise' is not one of"),
    ('model.latents', {'kind': 'pixels', 'factor': 4}, "model.latents.kind: 'pixels'"),
    ('model.latents', {'kind': 'space_to_depth'}, 'model.latents.factor: missing'),
    ('model.text', {'encoder': 'precomputed', 'embeddings': '/nowhere.safetensors',
                    'max_len': 16, 'width': 16, 'depth': 1, 'heads': 2},
     "model.text.embeddings: '/nowhere.safetensors': no such file"),
    ('model.layers', ('foreground', 'ghost'), "model.layers\\[1\\]: 'ghost' is not one of"),
    ('loss.weights', {'flow': 1.0, 'alpah': 1.0},
     "loss.weights: unknown key 'alpah' \\(did you mean 'alpha'\\?\\)"),
    ('optimizer.lr_mults', (('alpha_head(', 2.0),), r"optimizer.lr_mults\[0\]: bad regex"),
    ('optimizer.clip_groups', ('alpha_head(',), r"optimizer.clip_groups\[0\]: bad regex"),
    ('eval.batch_per_device', 0, 'eval.batch_per_device: expected an int >= 1'),
])
def test_training_config_errors_name_the_key(data_dir, key, value, message):
  with pytest.raises(ConfigError, match=message):
    train_config.check(_set(tiny(data_dir), key, value))


def test_unknown_and_missing_training_keys(data_dir):
  c = tiny(data_dir)
  c.data.image_sise = (32, 32)
  with pytest.raises(ConfigError, match="data: unknown key 'image_sise' "
                                        "\\(did you mean 'image_size'\\?\\)"):
    train_config.check(c)
  c = tiny(data_dir)
  del c.data['boundary_band']
  with pytest.raises(ConfigError, match='data.boundary_band: missing'):
    train_config.check(c)


def test_config_errors_come_before_any_data_or_model_work(data_dir, tmp_path, monkeypatch):
  def never(*a, **k):
    raise AssertionError('work started before the config was checked')
  monkeypatch.setattr(trainer, 'make_loader', never)
  monkeypatch.setattr(trainer.build, 'build_model', never)
  with pytest.raises(ConfigError, match='keep_checkpoints'):
    trainer.train(tiny(data_dir, keep_checkpoints=0), tmp_path / 'run')
  c = tiny(data_dir, mesh=(3, 1, 1))  # divisibility needs the mesh: still before the loader
  with pytest.raises(ValueError, match=r'mesh shape \(3, 1, 1\) needs 3 devices'):
    trainer.train(c, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()


def test_mesh_minus_one_is_printed_as_minus_one():
  one = jax.devices()[:1]
  with pytest.raises(ValueError) as e:
    parallel.make_mesh((-1, 8, 1), one)
  assert str(e.value) == 'mesh shape (-1, 8, 1) needs a multiple of 8 devices, 1 available'


def test_config_arguments_name_the_key_and_type():
  with pytest.raises(ConfigError, match="unknown key 'stepz' \\(did you mean 'steps'\\?\\)"):
    load_config_file('liwi', 'demo,stepz=3')
  with pytest.raises(ConfigError, match="config argument steps: expected an int, got 'abc'"):
    load_config_file('liwi', 'demo,steps=abc')
  with pytest.raises(ConfigError, match="fallback: expected True or False, got 'no'"):
    engine_config.load('configs/engine.py:models,fallback=no')
  assert load_config_file('liwi', 'demo,steps=7,data_dir=7').data.data_dir == '7'


# --- engine configs -----------------------------------------------------------------------

@pytest.mark.parametrize('override,message', [
    ('decompose.max_side=big', "decompose.max_side: expected an int, got 'big'"),
    ('decompose.max_sid=3', "--set decompose: unknown key 'max_sid' \\(did you mean 'max_side'"),
    ('decompos.max_side=3', "--set: unknown key 'decompos' \\(did you mean 'decompose'"),
    ('decompose.shadows=no', "decompose.shadows: expected True or False, got 'no'"),
    ('decompose.max_side', "--set 'decompose.max_side': expected key=value"),
    ('decompose.max_clipped=1.5', r'decompose.max_clipped: expected a number in \[0, 1\]'),
    ("decompose.transparent='keep'", "decompose.transparent: 'keep' is not one of"),
    ('decompose.composite_over=(1, 1, 2)', r'decompose.composite_over\[2\]: expected a number '
                                           r'in \[0, 1\]'),
    ('decompose.min_side=600', 'decompose.min_side=600 is above decompose.max_side=512'),
    ('tool_timeout=0', 'tool_timeout: expected a number > 0, got 0'),
    ('runner.workers=-2', 'runner.workers: expected an int >= 0, got -2'),
    ("runner.splits={'train': 0}", 'runner.splits: some split needs a positive fraction'),
    ('tools.inpainter.name=telee', "tools.inpainter.name: 'telee' is not one of .*did you "
                                   "mean 'telea'"),
    ("agent={'name': 'lm'}", "agent.name: 'lm' is not one of \\['llm', 'rule_based'\\]"),
    ('synthesize.num_objects=(3, 1)', 'synthesize.num_objects: expected an ordered pair'),
    ('synthesize.shadow_tint=(0.1, 0.2)', 'synthesize.shadow_tint: expected a sequence of 3'),
    ('gennval.median_kernel=4', 'gennval.median_kernel: the median kernel must be an odd'),
    ('refine.heldout_fraction=2', r'refine.heldout_fraction: expected a number in \[0, 1\]'),
])
def test_engine_config_errors_name_the_key(override, message):
  with pytest.raises(ConfigError, match=message):
    engine_config.load(None, [override])


def test_engine_config_accepts_keys_added_to_the_defaults(monkeypatch):
  """A key another part of the engine adds to `default_config()` is known, typed by its
  default, without a spec entry of its own."""
  default = engine_config.default_config

  def with_background():
    c = default()
    c.decompose.background = (1.0, 1.0, 1.0)
    return c
  monkeypatch.setattr(engine_config, 'default_config', with_background)
  assert engine_config.load(None, ['decompose.background=(0.5, 0.5, 0.5)'])
  with pytest.raises(ConfigError, match="decompose.background: expected a sequence, got 'x'"):
    engine_config.load(None, ['decompose.background=x'])


# --- command lines ------------------------------------------------------------------------

@pytest.mark.parametrize('main,argv,message', [
    (engine_main, ['synthesize', '--bank', 'b', '--output', 'o', '--num', '-3'],
     "python -m data_engine synthesize: argument --num: expected an int >= 1, got '-3'"),
    (engine_main, ['synthesize', '--bank', 'b', '--output', 'o', '--num', '3', '--start',
                   'x'], "argument --start: expected an int >= 0, got 'x'"),
    (engine_main, ['embed-texts', '--samples', 's', '--weights', 'w', '--out', 'o',
                   '--batch-size', '0'], "argument --batch-size: expected an int >= 1"),
    (engine_main, ['build-tfds', 'd', '--set', 'runner.workers=many'],
     "runner.workers: expected an int, got 'many'"),
    (engine_main, ['decompose', '--input', 'i', '--output', 'o', '--config', 'nope.py'],
     'config nope.py: no such file'),
    (engine_main, ['frobnicate'], "argument command: invalid choice: 'frobnicate'"),
    (importers_main, ['crello', 'x.parquet', '--output', 'o', '--max-size', '0'],
     "argument --max-size: expected an int >= 1, got '0'"),
    (importers_main, ['mulan', '--pairs', 'p.csv', '--output', 'o', '--limit', 'ten'],
     "argument --limit: expected an int >= 0, got 'ten'"),
    (convert_main.main, ['to-diffusers', 'a', 'b', '--max-shard-size', '0MB'],
     "argument --max-shard-size: expected a size > 0 such as 5GB, 500MB or 1024, got '0MB'"),
    (convert_main.main, ['from-diffusers', 'nowhere', 'b'],
     'nowhere: no config.json here nor in transformer/, vae/ subfolders'),
])
def test_cli_errors_are_one_line_exit_2(main, argv, message, capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert main(argv) == 2
  assert message in one_error_line(capsys)


def test_verbose_adds_the_traceback(capsys, tmp_path):
  argv = ['from-diffusers', str(tmp_path / 'nowhere'), str(tmp_path / 'b')]
  assert convert_main.main([*argv, '--verbose']) == 2
  err = capsys.readouterr().err
  assert 'Traceback (most recent call last)' in err and err.splitlines()[-1].startswith('error: ')


def test_output_path_that_is_a_file(tmp_path, capsys, data_dir):
  file = tmp_path / 'taken.txt'
  file.write_text('not a folder')
  assert importers_main(['crello', str(crello_file(tmp_path)), '--output', str(file)]) == 2
  assert str(file) in one_error_line(capsys)
  assert engine_main(['synthesize', '--bank', str(tmp_path), '--num', '1', '--output',
                      str(file), '--quiet']) == 2
  assert str(file) in one_error_line(capsys)
  # the training workdir (`python -m layerjax.main --workdir`): the same one line
  assert cli.run(lambda: trainer.train(tiny(data_dir), file), verbose=False) == 2
  assert str(file) in one_error_line(capsys)
  assert file.read_text() == 'not a folder'


def _disk_full(*args, **kwargs):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_names_the_path(tmp_path, capsys, monkeypatch):
  src = _tiny_transformer_folder(tmp_path / 'src')
  assert convert_main.main(['from-diffusers', str(src), str(tmp_path / 'orbax')]) == 0
  capsys.readouterr()
  monkeypatch.setattr('layerjax.convert.files.save_file', _disk_full)
  assert convert_main.main(['to-diffusers', str(tmp_path / 'orbax'),
                            str(tmp_path / 'back')]) == 1
  assert one_error_line(capsys) == (f'{tmp_path / "back"}: disk full '
                                    f'({os.strerror(errno.ENOSPC)})')
  monkeypatch.setattr(pathlib.Path, 'write_bytes', _disk_full)
  out = tmp_path / 'imported'
  assert importers_main(['crello', str(crello_file(tmp_path)), '--output', str(out)]) == 1
  assert one_error_line(capsys).startswith(f'{out / "crello-good"}: disk full')


# --- the absl app (`python -m layerjax.main`) ---------------------------------------------

def test_main_flag_and_config_errors_are_one_line_exit_2(tmp_path):
  cases = {
      '--config.total_steps=abc': "error: --config.total_steps: expected an int, got 'abc'",
      '--config.total_stepz=3':
          "error: --config.total_stepz: unknown key 'total_stepz' (did you mean "
          "'total_steps'?)",
      '--config.keep_checkpoints=0': 'error: keep_checkpoints: expected an int >= 1, got 0',
      '--config=configs/liwi.py:demo,stepz=3':
          "error: --config=configs/liwi.py:demo,stepz=3: config argument 'demo,stepz=3': "
          "unknown key 'stepz' (did you mean 'steps'?)",
  }
  main = ['layerjax.main', '--config=configs/liwi.py:demo']
  # The demo's --config has a default, which ml_collections loads with the overrides as the
  # flag is defined, at import.
  runs = [(main, flag) for flag in cases] + [
      (['layerjax.demo'], flag) for flag in ('--config.total_steps=abc', '--config.total_stepz=3')]
  procs = [(flag, subprocess.Popen(
      [sys.executable, '-m', *command, flag, f'--workdir={tmp_path / "run"}'], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for command, flag in runs]
  for flag, proc in procs:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (proc.args, err)
    assert err.strip() == cases[flag], proc.args
  assert not (tmp_path / 'run').exists()


# --- checkpoints --------------------------------------------------------------------------

@pytest.fixture(scope='module')
def checkpointed(tmp_path_factory, data_dir):
  """A workdir with real checkpoints at steps 1 and 2 (state and loader state), written by
  the trainer's `Checkpoints` from a tiny model's initial state (on one device: quicker)."""
  c = tiny(data_dir, total_steps=4)
  c.model.mmdit.num_layers = 1
  setup = trainer.create(c, parallel.make_mesh((1, 1, 1), jax.devices()[:1]))
  iterator = iter(pipeline.make_loader(c.data, 'train', None))
  workdir = tmp_path_factory.mktemp('checkpointed')
  ckpt = checkpoints.Checkpoints(workdir / 'checkpoints', 3, async_save=False)
  for step in (1, 2):
    next(iterator)
    ckpt.save(step, {**setup.state, 'step': jnp.int32(step)}, iterator)
  ckpt.close()
  return c, setup, workdir


def _copy(workdir, tmp_path):
  shutil.copytree(workdir, tmp_path / 'run')
  return tmp_path / 'run', tmp_path / 'run' / 'checkpoints'


def test_truncated_checkpoint_names_step_and_the_way_back(checkpointed, tmp_path, capsys):
  config, setup, workdir = checkpointed
  run, ckpts = _copy(workdir, tmp_path)
  biggest = max((p for p in (ckpts / '2').rglob('*') if p.is_file()),
                key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:100])

  def restore_latest():  # as `restore_for_eval` does, without building the model again
    ckpt = checkpoints.Checkpoints(ckpts, 3, async_save=False)
    return ckpt.restore(ckpt.latest(), setup.state)['step']
  assert cli.run(restore_latest, verbose=False) == 2
  line = one_error_line(capsys)
  command = f'mv {ckpts / "2"} {ckpts / "2.unreadable"}'
  assert line.startswith(f'checkpoint step 2: {ckpts / "2"} cannot be read (')
  assert line.endswith(f'; if it is corrupt or truncated, start from step 1 by moving it '
                       f'aside: {command}')
  subprocess.run(shlex.split(command), check=True)  # what the message says to do
  assert restore_latest() == 1


def test_corrupt_loader_state_stops_training_before_compiling(checkpointed, tmp_path,
                                                              monkeypatch):
  config, setup, workdir = checkpointed
  run, ckpts = _copy(workdir, tmp_path)
  (ckpts / '2' / 'data' / 'process_0-of-1.json').write_text('{"trunc')
  monkeypatch.setattr(trainer, 'create', lambda config, mesh=None: setup)
  monkeypatch.setattr(trainer, 'make_step', lambda setup: pytest.fail('compiled'))
  with pytest.raises(checkpoints.UnreadableCheckpoint, match=r'checkpoint step 2: .*start from '
                                                          r'step 1 by moving it aside: mv'):
    trainer.train(config, run)


def test_checkpoints_of_another_config_name_its_keys_and_keep_its_record(checkpointed,
                                                                         tmp_path, monkeypatch):
  config, setup, workdir = checkpointed
  run, _ = _copy(workdir, tmp_path)
  recorded = json.dumps(config.to_dict(), indent=2) + '\n'  # as the trainer records it
  (run / 'config.json').write_text(recorded)
  other = config.copy_and_resolve_references()
  other.model.mmdit.num_layers = 2  # the run's checkpoints hold one block
  why = (rf'^checkpoint step 2: .* cannot be read \(.*\)[^\n]*\. The run was trained with '
         rf'another config \({re.escape(str(run / "config.json"))}: model\.mmdit\.num_layers: '
         rf'1 -> 2\): if that changes the model or its optimizer, train in a new workdir$')
  monkeypatch.setattr(trainer, 'make_step', lambda setup: pytest.fail('compiled'))
  with pytest.raises(checkpoints.UnreadableCheckpoint, match=why):
    trainer.train(other, run)
  assert (run / 'config.json').read_text() == recorded
  with pytest.raises(checkpoints.UnreadableCheckpoint, match=why):
    trainer.restore_for_eval(other, run)


# --- dataset shards -----------------------------------------------------------------------

def test_truncated_shard_is_named(data_dir, tmp_path):
  copy = tmp_path / 'tfds'
  shutil.copytree(data_dir, copy)
  (shard,) = (copy / 'layered').glob('*/layered-train.array_record-*')
  shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
  c = tiny(copy)
  with pytest.raises(pipeline.CorruptShard) as e:
    next(iter(pipeline.make_loader(c.data, 'train', None)))
  assert str(e.value).startswith(f'{shard}: record ')
  assert 'the shard is corrupt or truncated' in str(e.value)
  assert cli.exit_code(e.value) == 2 and '\n' not in cli.message(e.value)


# --- the NaN stop -------------------------------------------------------------------------

# `python -m layerjax.main` whose third train step has a NaN loss; the loop, its logs, the
# checkpoints and the loader's worker processes are the real ones, the model a stand-in (no
# model built or compiled).
NAN_MAIN = '''
import jax
import jax.numpy as jnp
from layerjax import cli, main
from layerjax.train import trainer

def create(config, mesh=None):
  state = {'step': jnp.int32(0), 'params': {'w': jnp.zeros(3)}}
  return trainer.Setup(config, mesh, None, None, state, None, None)

def make_step(setup):
  def step(state, frozen, batch):
    nan = state['step'] == 2
    return ({**state, 'step': jnp.where(nan, state['step'], state['step'] + 1)},
            {'loss': jnp.where(nan, jnp.nan, 1.0), 'finite': ~nan})
  return jax.jit(step)  # the trainer compiles it as it does make_step's

trainer.create, trainer.make_step = create, make_step
cli.run_absl(main.main)
'''


def test_nan_stop_numbers_steps_as_the_log_and_exits_cleanly(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-c', NAN_MAIN, f'--config={ROOT}/configs/liwi.py:demo',
       f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
       '--config.data.image_size=(32, 32)', '--config.data.global_batch_size=4',
       '--config.data.num_workers=1', '--config.total_steps=8', '--config.log_every=1',
       '--config.checkpoint_every=1', '--config.eval_every=0',
       '--config.model.mmdit.num_layers=1'],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=devices_env(1))
  assert proc.returncode == 1, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  logged = [int(l.split('step ')[1].split('/')[0]) for l in lines if '] step ' in l]
  assert logged == [1, 2]  # the log counts finished steps
  errors = [l for l in lines if l.startswith('error: ')]
  assert errors == [f"error: step 3/8: non-finite ['loss']; training stopped, last good "
                    f"checkpoint: step 2 in {workdir / 'checkpoints'}"]
  assert 'Traceback' not in proc.stderr and 'Exception ignored' not in proc.stderr
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['1', '2']
  # The terminal has the progress lines; the log file has them, every metric (the writer's
  # details) and the libraries' INFO lines (Orbax's checkpointing).
  log = (workdir / 'log.txt').read_text()
  assert '] step 1/8' in log and '] [1] examples_per_s=' in log
  assert '] [1] ' not in proc.stderr and 'hparams' not in proc.stderr
  # (Orbax's warnings, e.g. of a slow save on a busy machine, stay on the terminal.)
  orbax = [l for l in log.splitlines() if l.startswith('I') and 'checkpoint_manager.py' in l]
  assert orbax and not any(l.startswith('I') and 'checkpoint_manager.py' in l for l in lines)


# --- non-finite weights in conversions ----------------------------------------------------

def _tiny_transformer(seed: int = 0) -> mmdit.SD3Transformer2DModel:
  return mmdit.SD3Transformer2DModel(mmdit.MMDiTConfig(
      sample_size=8, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
      num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
      pooled_projection_dim=10, pos_embed_max_size=8), rngs=nnx.Rngs(seed))


def _tiny_transformer_folder(path):
  return diffusers.save_transformer(_tiny_transformer(), path)


def test_nonfinite_tensor_read_is_named(tmp_path, capsys, caplog):
  src = _tiny_transformer_folder(tmp_path / 'src')
  tensors = load_file(src / WEIGHTS)
  weight = tensors['proj_out.weight'].copy()
  weight[0, :2] = [np.nan, np.inf]
  save_file({**tensors, 'proj_out.weight': weight}, src / WEIGHTS)
  assert convert_main.main(['from-diffusers', str(src), str(tmp_path / 'o')]) == 2
  assert one_error_line(capsys).startswith(f"{src}: tensor 'proj_out.weight' has 1 NaN and 1 "
                                           'Inf of ')
  assert not (tmp_path / 'o').exists()
  with pytest.raises(diffusers.NonFiniteWeights, match="'proj_out.weight'"):
    diffusers.load_transformer(src)
  assert convert_main.main(['from-diffusers', str(src), str(tmp_path / 'o'),
                            '--allow-nonfinite']) == 0
  assert "tensor 'proj_out.weight' has 1 NaN and 1 Inf" in caplog.text


def test_nonfinite_tensor_written_is_named(tmp_path, capsys):
  model = _tiny_transformer()
  model.proj_out.bias.set_value(model.proj_out.bias[...].at[0].set(jnp.nan))
  checkpoint.save_checkpoint(model, 'transformer', tmp_path / 'nan')
  assert convert_main.main(['to-diffusers', str(tmp_path / 'nan'), str(tmp_path / 'o')]) == 2
  assert one_error_line(capsys).startswith(
      f"export to {tmp_path / 'o'}: tensor 'proj_out.bias' has 1 NaN and 0 Inf of 16 values")
  assert not (tmp_path / 'o').exists()
  # a cast that overflows: 1e6 is Inf in float16
  model = _tiny_transformer()
  model.proj_out.bias.set_value(model.proj_out.bias[...].at[3].set(1e6))
  checkpoint.save_checkpoint(model, 'transformer', tmp_path / 'big')
  assert convert_main.main(['to-diffusers', str(tmp_path / 'big'), str(tmp_path / 'o'),
                            '--dtype', 'float16']) == 2
  assert "'proj_out.bias' has 0 NaN and 1 Inf" in one_error_line(capsys)
  assert convert_main.main(['to-diffusers', str(tmp_path / 'big'), str(tmp_path / 'o')]) == 0
