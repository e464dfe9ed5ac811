"""The engine's core: registry, guarded tool calls (raise / hang / garbage), config loading,
and the runners' resumable, idempotent bookkeeping with a work function made here."""

import functools
import json
import threading
import time

import numpy as np
import pytest

from data_engine import config as engine_config
from data_engine import core, runners
from data_engine.core import Drop
from layerjax.data import schema
from test_schema import make_sample


# --- registry and guarded calls -------------------------------------------------------------

def test_registry_errors_name_the_kind_and_choices():
  with pytest.raises(ValueError, match="unknown tool kind 'teleporter'"):
    core.create('teleporter', 'x')
  with pytest.raises(ValueError, match=r"unknown inpainter 'magic'; registered: \[.*'telea'"):
    core.create('inpainter', 'magic')
  with pytest.raises(ValueError, match="inpainter 'telea': bad options"):
    core.create('inpainter', {'name': 'telea', 'radiu': 3})


def test_a_tool_that_cannot_be_built_falls_back_only_when_the_config_says_so(tmp_path):
  spec = {'name': 'diffusers', 'path': str(tmp_path / 'no-weights')}
  with pytest.raises(FileNotFoundError, match='no-weights'):
    core.create('inpainter', spec)
  fallbacks = []
  tool = core.create('inpainter', {**spec, 'fallback': {'name': 'telea', 'radius': 2}},
                     fallbacks)
  assert type(tool).__name__ == 'Telea' and tool.radius == 2
  assert fallbacks == [{'kind': 'inpainter', 'wanted': 'diffusers', 'used': 'telea',
                        'because': fallbacks[0]['because']}]
  assert 'no-weights' in fallbacks[0]['because']
  with pytest.raises(ValueError, match='bad options'):  # a typo is not a reason to fall back
    core.create('inpainter', {'name': 'telea', 'radiu': 3, 'fallback': 'navier_stokes'})


def test_call_tool_turns_failures_into_drops():
  assert core.call_tool('ok', lambda: 3, 1.0) == 3
  with pytest.raises(Drop) as e:
    core.call_tool('bad', lambda: 1 / 0, 1.0)
  assert e.value.reason == 'tool_error' and 'ZeroDivisionError' in e.value.detail
  with pytest.raises(Drop) as e:
    core.call_tool('garbage', lambda: np.full((2, 2), np.nan), 1.0, core.check_array((2, 2)))
  assert e.value.reason == 'tool_garbage' and 'non-finite' in e.value.detail
  with pytest.raises(Drop) as e:
    core.call_tool('shape', lambda: np.zeros((3, 2)), 1.0, core.check_array((2, 2)))
  assert 'shape (3, 2)' in e.value.detail


def test_call_tool_times_out_on_and_off_the_main_thread():
  t0 = time.perf_counter()
  with pytest.raises(Drop) as e:
    core.call_tool('sleepy', lambda: time.sleep(30), 0.2)
  assert e.value.reason == 'tool_timeout' and time.perf_counter() - t0 < 5
  caught = []

  def in_thread():
    try:
      core.call_tool('sleepy', lambda: time.sleep(30), 0.2)
    except Drop as d:
      caught.append(d.reason)
  t = threading.Thread(target=in_thread)
  t.start()
  t.join(10)
  assert caught == ['tool_timeout']


# --- config --------------------------------------------------------------------------------

def test_config_file_variant_and_overrides(tmp_path):
  c = engine_config.load('configs/engine.py:fast', ['decompose.min_psnr=30.5',
                                                    "tools.inpainter={'name': 'navier_stokes'}"])
  assert c.decompose.shadows is False and c.decompose.min_psnr == 30.5
  assert c.tools.inpainter['name'] == 'navier_stokes'
  with pytest.raises(ValueError, match="decompose: unknown key 'min_psnrr'"):
    engine_config.load(None, ['decompose.min_psnrr=1'])
  with pytest.raises(ValueError, match='expected key=value'):
    engine_config.load(None, ['decompose.min_psnr'])
  with pytest.raises(FileNotFoundError, match='nope.py'):
    engine_config.load(str(tmp_path / 'nope.py'))
  with pytest.raises(ValueError, match="unknown variant 'huge'"):
    engine_config.load('configs/engine.py:huge')


def test_models_config_fails_on_missing_weights_unless_it_may_fall_back(tmp_path):
  from data_engine import stages
  spec = f'configs/engine.py:models,weights={tmp_path}'
  with pytest.raises(FileNotFoundError, match=f"'depth_anything': weights folder {tmp_path}/"):
    stages.Context(engine_config.load(spec))
  ctx = stages.Context(engine_config.load(spec + ',fallback=True'))
  used = {f['kind']: (f['wanted'], f['used']) for f in ctx.fallbacks}
  assert used == {'detector': ('ensemble', 'saliency_boxes'), 'segmenter': ('sam', 'grabcut'),
                  'depth': ('depth_anything', 'vertical_prior'),
                  'matting': ('vitmatte', 'closed_form'), 'inpainter': ('diffusers', 'telea'),
                  'text_check': ('clip', 'rule_based')}
  assert all(str(tmp_path) in f['because'] for f in ctx.fallbacks)
  endpoint = engine_config.load(spec + ',endpoint=http://localhost:1/v1,model=m')
  assert endpoint.agent['backend'].to_dict() == {
      'name': 'openai', 'base_url': 'http://localhost:1/v1', 'model': 'm',
      'api_key_env': 'OPENAI_API_KEY'}
  assert endpoint.tools.captioner['name'] == 'agent'


# --- runners --------------------------------------------------------------------------------

CALLS = []


def _work_factory(fail_on=(), crash_after=None):
  def work(key):
    CALLS.append(key)
    if crash_after is not None and len(CALLS) > crash_after:
      raise KeyboardInterrupt  # a kill: not an input's fault, so it is not caught
    if key in fail_on:
      raise RuntimeError(f'bug on {key}')
    if key.endswith('7'):
      return runners.Result(key, [], [{'stage': 'prefilter', 'passed': False,
                                       'reason': 'too_small', 'details': {}, 'seconds': 0}],
                            'prefilter: too_small')
    sample = make_sample(seed=int(key))
    sample.id = f'sample-{key}'
    return runners.Result(key, [sample], [{'stage': 'prefilter', 'passed': True, 'reason': '',
                                           'details': {}, 'seconds': 0}])
  return work


def manifest_keys(out):
  return [json.loads(l)['key'] for l in (out / runners.MANIFEST).read_text().splitlines()]


def test_local_runner_records_drops_crashes_and_summary(tmp_path):
  keys = [f'{i:02d}' for i in range(10)]
  summary = runners.run_local(keys, functools.partial(_work_factory, fail_on=('03',)), tmp_path,
                              progress=False)
  assert summary['inputs'] == 10 and summary['samples'] == 8 and summary['dropped'] == 2
  assert summary['drop_reasons'] == {'prefilter: too_small': 1, 'engine: crash': 1}
  assert summary['stages']['prefilter'] == {'passed': 8, 'dropped': 1, 'pass_rate': 8 / 9}
  assert json.loads((tmp_path / runners.SUMMARY).read_text()) == summary
  assert sorted(p.name for p in (tmp_path / 'samples').iterdir()) == [
      f'sample-{k}' for k in keys if k not in ('03', '07')]
  schema.read_folder(tmp_path / 'samples' / 'sample-00')


def test_interrupted_run_resumes_without_loss_or_duplicates(tmp_path):
  keys = [f'{i:02d}' for i in range(10)]
  CALLS.clear()
  with pytest.raises(KeyboardInterrupt):
    runners.run_local(keys, functools.partial(_work_factory, crash_after=4), tmp_path,
                      progress=False)
  assert manifest_keys(tmp_path) == keys[:4]
  # A torn manifest line (killed mid-append) and a stray temp folder are tolerated.
  with open(tmp_path / runners.MANIFEST, 'a') as f:
    f.write('{"key": "04", "samp')
  (tmp_path / 'samples' / '.sample-04.tmp-x').mkdir()
  CALLS.clear()
  summary = runners.run_local(keys, _work_factory, tmp_path, progress=False)
  assert CALLS == keys[4:]                       # finished inputs are not redone
  done = [k for k in manifest_keys(tmp_path) if k]
  assert sorted(set(done)) == keys and len(done) == len(keys)
  assert summary['inputs'] == 10 and summary['samples'] == 9
  CALLS.clear()
  runners.run_local(keys, _work_factory, tmp_path, progress=False)
  assert CALLS == []


def _endpoint_work_factory(down: bool):
  def work(key):
    if down and key in ('01', '02'):  # the agent endpoint was unreachable for these
      return runners.Result(key, [], [{'stage': 'postfilter', 'passed': False,
                                       'reason': 'agent_unavailable', 'details': {},
                                       'seconds': 0}], 'postfilter: agent_unavailable')
    return _work_factory()(key)
  return work


def test_inputs_dropped_by_a_down_endpoint_are_redone_on_rerun(tmp_path):
  keys = [f'{i:02d}' for i in range(4)] + ['07']
  summary = runners.run_local(keys, functools.partial(_endpoint_work_factory, True), tmp_path,
                              progress=False)
  assert summary['dropped'] == 3 and summary['retry_on_rerun'] == 2
  assert summary['drop_reasons'] == {'postfilter: agent_unavailable': 2,
                                     'prefilter: too_small': 1}
  CALLS.clear()
  summary = runners.run_local(keys, functools.partial(_endpoint_work_factory, False), tmp_path,
                              progress=False)
  assert CALLS == ['01', '02']  # a too-small photo stays dropped; the others were done
  assert summary['samples'] == 4 and summary['dropped'] == 1 and summary['retry_on_rerun'] == 0


def test_worker_processes_give_the_same_outputs(tmp_path):
  keys = [f'{i:02d}' for i in range(6)]
  runners.run_local(keys, _work_factory, tmp_path / 'a', progress=False)
  runners.run_local(keys, _work_factory, tmp_path / 'b', workers=2, progress=False)
  assert_same_outputs(tmp_path / 'a', tmp_path / 'b')


def test_beam_runner_gives_the_same_outputs_and_resumes(tmp_path):
  keys = [f'{i:02d}' for i in range(6)]
  runners.run_local(keys, _work_factory, tmp_path / 'local', progress=False)
  runners.run_beam(keys[:3], _work_factory, tmp_path / 'beam')
  summary = runners.run_beam(keys, _work_factory, tmp_path / 'beam')
  assert summary['inputs'] == 6
  assert_same_outputs(tmp_path / 'local', tmp_path / 'beam')


def assert_same_outputs(a, b):
  def lines(out):
    return sorted((json.loads(l) for l in (out / runners.MANIFEST).read_text().splitlines()),
                  key=lambda e: e['key'])
  assert lines(a) == lines(b)
  files_a = sorted(p.relative_to(a) for p in (a / 'samples').rglob('*') if p.is_file())
  files_b = sorted(p.relative_to(b) for p in (b / 'samples').rglob('*') if p.is_file())
  assert files_a == files_b and files_a
  for rel in files_a:
    assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
