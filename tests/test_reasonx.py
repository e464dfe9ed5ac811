"""Reward finetuning (issue 22): `layerjax.train.reasonx` end to end on the tiny trained model,
with the offline ground-truth judge and with the llm agent behind the local chat server; the
photo source and the one-object reading the rewards use."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from chat_server import ChatServer, answer
from oracle_judge import relate_oracle
from train_utils import (ROOT, finish, launch_main, load_config_file, one_device,
                         persistent_compile_cache)

from layerjax.data.pipeline import tfds_split
from layerjax.data.schema import Layer, LayeredSample, Prompt
from layerjax.data.tfds_builder import from_example
from layerjax.infer import model as infer_model
from layerjax.infer.decomposer import Decomposer
from layerjax.models.decomposer import TRAINABLE
from layerjax.reward import photos, relations
from layerjax.reward.relations import Relation, Thresholds, read
from layerjax.reward.rewards import RelationReward
from layerjax.train import reasonx

KEY_ENV = 'LAYERJAX_TEST_JUDGE_KEY'


def config_for(start, data_dir, arg='demo', **top):
  """configs/reasonx.py:`arg` shrunk to the tiny model: 2 photos x 2 decompositions a step."""
  c = load_config_file('reasonx', arg)
  c.reasonx.start = str(start)
  c.data = {'data_dir': str(data_dir)}
  c.total_steps, c.log_every, c.eval_every, c.checkpoint_every = 2, 1, 2, 1
  c.eval = {'split': 'validation', 'num_batches': 1, 'batch_per_device': 2, 'sample_steps': 2}
  r = c.reasonx
  r.photos, r.held_out, r.held_out_photos = 'tfds:train', 'tfds:validation', 2
  r.photos_per_step, r.group_size, r.sample_photos = 2, 2, 1
  r.sample_steps, r.timesteps, r.minibatches, r.relations = 3, 2, 2, 4
  r.judge.workers = 2
  r.prompts = 'dataset'  # the engine's saliency boxes miss a disc over a gradient
  for key, value in top.items():
    c[key] = value
  return reasonx.full_config(c)


def finetune(config, workdir) -> dict:
  """`reasonx.finetune` on one device (`one_device`; the end-to-end run: 50 -> ~30 s)."""
  return reasonx.finetune(config, workdir, mesh=one_device(config))


def scenes(data_dir, split):
  records = tfds_split('layered', data_dir, split)
  return [from_example(records[i]) for i in range(len(records))]


def audit_lines(workdir):
  return [json.loads(line) for f in sorted((workdir / 'audit').glob('steps_*.jsonl'))
          for line in f.read_text().splitlines()]


def weights(path, step=None) -> list[np.ndarray]:
  """The trainable weights a user loads from `path` (the EMA: the finetuned weights, as the
  reasonx configs keep no average)."""
  model = infer_model.load(path, step=step).model
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, TRAINABLE))]


@pytest.fixture(scope='module', autouse=True)
def compile_cache(tmp_path_factory):
  """The module's finetuning runs compile the same sampler and update: once."""
  with persistent_compile_cache(tmp_path_factory.mktemp('jax_cache')):
    yield


@pytest.fixture(scope='module')
def start(trained_workdirs):
  """(the tiny trained workdir a finetuning starts from, its dataset)."""
  config, workdir = trained_workdirs('pixels')
  return workdir, config.data.data_dir


# The relation reward (weight 1) mixed with the rule-based agent's pairwise preference.
WITH_PREFERENCE = 'demo,preference=0.5'


@pytest.fixture(scope='module')
def finetuned(start, tmp_path_factory):
  """Two steps of finetuning with the offline judge and the preference reward: (config,
  workdir, result)."""
  config = config_for(*start, WITH_PREFERENCE)
  workdir = tmp_path_factory.mktemp('reasonx') / 'run'
  return config, workdir, finetune(config, workdir)


def test_short_run_end_to_end(finetuned, start):
  config, workdir, result = finetuned
  assert result['step'] == 2
  for step in (0, 2):  # the held-out reward and the layer metrics, before and after
    held = json.loads((workdir / 'eval' / f'held_out_{step}.json').read_text())
    assert 0 <= held['held_out/reward'] <= 1 and held['held_out/photos_rewarded'] == 2
    assert (workdir / 'eval' / f'validation_{step}.json').is_file()
  assert json.loads((workdir / 'config.json').read_text())['reasonx']['group_size'] == 2
  truth = {f'train/{s.id}': s for s in scenes(start[1], 'train')}
  lines = audit_lines(workdir)
  assert [line['step'] for line in lines] == [1, 1, 2, 2]  # a file per checkpoint
  thresholds = Thresholds(**dict(config.reasonx.thresholds))
  asked = 0
  for line in lines:
    scene = truth[line['photo']]
    assert line['target'] in [l.name for l in scene.layers if l.kind == 'object']
    for q in line['relations']:  # the judge's answers are the scene's ground truth
      rel = Relation(q['kind'], (line['target'],), tuple(q['point']))
      assert q['judge'] == read(scene, rel, thresholds)
      asked += 1
    (pair,) = line['preference']  # a group of 2: one comparison, both orders
    assert (pair['a'], pair['b']) == (0, 1) and len(pair['orders']) == 2
    won = {'a': (1.0, 0.0), 'b': (0.0, 1.0), 'tie': (0.5, 0.5)}[pair['winner']]
    for i, reward in enumerate(line['rewards']):  # share of agreements, and preference / 2
      agree = [q['samples'][i] == q['judge'] for q in line['relations']]
      assert reward == pytest.approx((sum(agree) / len(agree) + 0.5 * won[i]) / 1.5)
    r = np.asarray(line['rewards'])
    if r.max() > r.min():  # a group of 2: advantages +-|d| / 2 / (|d| / 2 + 1e-4)
      d = abs(r[0] - r[1]) / 2
      want = np.sign(r - r.mean()) * d / (d + 1e-4)
      np.testing.assert_allclose(line['advantages'], want, rtol=1e-5)
      assert line['kept'] == [True, True]
    else:
      assert line['advantages'] == [0, 0] and line['kept'] == [False, False]
  assert asked >= 8
  # The finetuned workdir is a model users decompose with.
  sample = Decomposer.load(workdir).decompose(scenes(start[1], 'validation')[0].image,
                                              {'box': (4, 4, 28, 28)})
  assert [l.kind for l in sample.layers][0] == 'background'


def test_constant_reward_makes_no_update(start, tmp_path, monkeypatch):
  """After a step with a real reward (so AdamW has moments), a step whose rewards are all
  equal changes no weight: every group is dropped and no optimizer step is taken."""
  real = RelationReward.__call__
  calls = []

  def reward(self, image, target, label, samples, rng):
    calls.append(1)
    if len(calls) <= 2:  # the first step's two photos
      return real(self, image, target, label, samples, rng)
    return [0.5] * len(samples), {'relations': []}

  monkeypatch.setattr(RelationReward, '__call__', reward)
  config = config_for(*start, eval_every=0)
  finetune(config, tmp_path)
  lines = audit_lines(tmp_path)
  assert [line['kept'] for line in lines[2:]] == [[False, False]] * 2
  before, after = weights(tmp_path, 1), weights(tmp_path, 2)
  assert any(np.any(a != b) for a, b in zip(weights(start[0]), before))  # step 1 moved
  for a, b in zip(before, after):
    np.testing.assert_array_equal(a, b)


def test_resume_is_exact(finetuned, start, tmp_path):
  """One step, stopped, resumed to the second: the same weights, audit and counts of
  dropped groups as two steps straight. (Evaluating reads the state and writes files only:
  these runs leave it out, as its compilation is most of a run's time.)"""
  config = config_for(*start, WITH_PREFERENCE, total_steps=1, eval_every=0)
  finetune(config, tmp_path)
  resumed = finetune(config_for(*start, WITH_PREFERENCE, total_steps=2, eval_every=0), tmp_path)
  straight = finetuned[1]
  for a, b in zip(weights(straight, 2), weights(tmp_path, 2)):
    np.testing.assert_array_equal(a, b)
  assert audit_lines(tmp_path) == audit_lines(straight)
  groups = lambda result: {k: v for k, v in result['train'].items()
                           if k.startswith(('count/groups/', 'count/photos/',
                                            'count/preference/'))}
  assert groups(resumed) == groups(finetuned[2]) and groups(resumed)['count/groups/groups'] == 4


def test_judge_behind_an_endpoint(start, tmp_path, monkeypatch):
  """The llm agent as judge over HTTP (the oracle answers from the ground truth): the same
  answers as the offline judge; a garbage reply drops that photo's group, counted, and the
  run goes on; answers are cached beside the checkpoints."""
  monkeypatch.setenv(KEY_ENV, 'k')
  data_dir = start[1]
  with ChatServer(respond=relate_oracle(scenes(data_dir, 'train'))) as server:
    server.push(answer('this is not JSON'))  # the first request
    config = config_for(*start, total_steps=1, eval_every=0)
    config.reasonx.judge.kind = 'agent'
    config.reasonx.judge.workers = 1  # the garbage reply goes to the first photo
    config.reasonx.judge.agent = {'name': 'llm', 'backend': {
        'name': 'openai', 'base_url': server.url, 'model': 'oracle', 'api_key_env': KEY_ENV,
        'timeout': 5.0, 'max_retries': 0}}
    result = finetune(config, tmp_path)
  assert len(server.requests) == 2  # one per photo, all of its questions in one request
  first, second = audit_lines(tmp_path)
  assert first['rewards'] == [None, None] and first['kept'] == [False, False]
  assert all(q['judge'] == 'unknown' for q in first['relations'])
  truth = {f'train/{s.id}': s for s in scenes(data_dir, 'train')}[second['photo']]
  for q in second['relations']:
    rel = Relation(q['kind'], (second['target'],), tuple(q['point']))
    assert q['judge'] == read(truth, rel, Thresholds())
  cached = (tmp_path / 'judge_cache.jsonl').read_text().splitlines()
  assert len(cached) == len({(q['kind'], tuple(q['point'])) for q in second['relations']})
  assert result['train']['reward'] == pytest.approx(np.mean(second['rewards']))


def test_judge_on_a_local_vlm(start, tiny_vlm, tmp_path):
  """`judge=FOLDER`: the llm agent asks a local vision-language model (transformers). This
  one is random, so its replies are garbage: every group is dropped with the reason counted,
  no step moves a weight, and the run ends normally."""
  config = config_for(*start, arg=f'demo,judge={tiny_vlm}', total_steps=1, eval_every=0)
  backend = config.reasonx.judge.agent.backend
  assert (backend.name, backend.path) == ('transformers', str(tiny_vlm))
  backend.max_new_tokens = 16
  result = finetune(config, tmp_path)
  lines = audit_lines(tmp_path)
  assert [line['rewards'] for line in lines] == [[None, None]] * 2
  assert all(q['judge'] == 'unknown' for line in lines for q in line['relations'])
  counts = {k: v for k, v in result['train'].items() if k.startswith('count/')}
  assert counts['count/judge/requests'] == 2 and counts['count/groups/too_few_rewards'] == 2
  assert counts['count/judge/questions'] == (counts.get('count/judge/agent_garbage', 0)
                                             + counts.get('count/judge/invalid_answer', 0)
                                             + counts.get('count/judge/agent_bad_output', 0))
  for a, b in zip(weights(start[0]), weights(tmp_path, 1)):
    np.testing.assert_array_equal(a, b)


def shard_files(workdir, pattern):
  """What each shard of a run wrote under `audit/` (`pattern` e.g. 'steps_*'), as
  {file name without its shard: [JSON of each shard's file]}."""
  out = {}
  for f in sorted((workdir / 'audit').glob(pattern)):
    name = f.name.replace('.shard0', '').replace('.shard1', '')
    lines = [json.loads(line) for line in f.read_text().splitlines()]
    out.setdefault(name, []).append(lines if f.suffix == '.jsonl' else lines[0])
  return out


@pytest.mark.slow
def test_two_processes_finetune_as_one(start, tmp_path):
  """Two processes with a CPU device each, and one process with two, finetune 2 steps from
  the same command line: the same photos, judge answers, rewards, advantages, held-out
  reward, counts and weights. Each process samples, judges and audits the groups of its own
  rows; the updates see both processes' rows in the one-process order."""
  workdir, data_dir = start
  args = [f'--config={ROOT}/configs/reasonx.py:{WITH_PREFERENCE},start={workdir},'
          f'data_dir={data_dir},photos=tfds:train,held_out=tfds:train,steps=2',
          *[f'--config.{k}={v}' for k, v in {
              'log_every': 1, 'eval_every': 2, 'checkpoint_every': 1,
              'eval.split': 'validation', 'eval.num_batches': 1, 'eval.batch_per_device': 2,
              'eval.sample_steps': 2, 'reasonx.held_out_photos': 3,  # 2 rows a process
              'reasonx.photos_per_step': 4, 'reasonx.group_size': 2,
              'reasonx.sample_photos': 2, 'reasonx.sample_steps': 3, 'reasonx.timesteps': 2,
              'reasonx.minibatches': 2, 'reasonx.relations': 4, 'reasonx.judge.workers': 2,
              'reasonx.prompts': 'dataset'}.items()]]
  runs = {'one': (1, 2), 'two': (2, 1)}  # processes, devices each
  procs = {name: launch_main(args, tmp_path / name, *shape) for name, shape in runs.items()}
  logs = {name: finish(p) for name, p in procs.items()}
  one, two = tmp_path / 'one', tmp_path / 'two'
  for log in logs['two']:
    assert 'step 2/2' in log, log[-3000:]

  # Each shard audits its own photos: together, what one process audits.
  steps = {n: [line for lines in shards for line in lines]
           for n, shards in shard_files(two, 'steps_*').items()}
  assert len(steps) == 2 and all(len(shards) == 2 for shards in
                                 shard_files(two, 'steps_*').values())
  key = lambda line: (line['step'], line['photo'])
  ones = {n: sorted(lines[0], key=key) for n, lines in shard_files(one, 'steps_*').items()}
  assert sorted(ones) == sorted(steps)
  for name, lines in steps.items():
    lines = sorted(lines, key=key)
    assert [key(a) for a in lines] == [key(b) for b in ones[name]]
    for a, b in zip(lines, ones[name]):
      assert (a['box'], a['target'], a['kept']) == (b['box'], b['target'], b['kept'])
      assert [q['judge'] for q in a['relations']] == [q['judge'] for q in b['relations']]
      np.testing.assert_allclose(a['rewards'], b['rewards'], atol=1e-6)
      np.testing.assert_allclose(a['advantages'], b['advantages'], atol=1e-4)
  # The counts, summed over the shards, and the held-out reward of every photo.
  for name, shards in shard_files(two, 'counts_*').items():
    summed = {}
    for counts in shards:
      for prefix, c in counts.items():
        into = summed.setdefault(prefix, {})
        for k, v in c.items():
          into[k] = into.get(k, 0) + v
    assert summed == shard_files(one, 'counts_*')[name][0]
  assert summed['groups']['groups'] == 8
  for step in (0, 2):
    a, b = (json.loads((w / 'eval' / f'held_out_{step}.json').read_text()) for w in (one, two))
    assert [p['photo'] for p in a['photos']] == [p['photo'] for p in b['photos']]
    assert len(a['photos']) == 3 and a['held_out/photos_rewarded'] == 3
    assert a['held_out/reward'] == pytest.approx(b['held_out/reward'], abs=1e-6)
    a, b = (json.loads((w / 'eval' / f'validation_{step}.json').read_text()) for w in (one, two))
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-5) for k in a)
  for a, b in zip(weights(one, 2), weights(two, 2), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)
  moved = max(np.abs(a - b).max() for a, b in zip(weights(workdir), weights(two, 2)))
  assert moved > 1e-5  # the steps did update the weights


@pytest.mark.parametrize('change, message', [
    (lambda c: setattr(c.reasonx, 'start', '/nonexistent'), '/nonexistent: no such folder'),
    (lambda c: setattr(c.reasonx, 'photos', '/nonexistent'),
     'judge.kind=ground_truth reads the scenes'),
    (lambda c: setattr(c.reasonx, 'photos', 'tfds:nosuch'), "no split 'nosuch'"),
    (lambda c: setattr(c.reasonx, 'minibatches', 3), 'minibatches=3 must divide'),
    (lambda c: setattr(c.reasonx, 'timesteps', 11), "timesteps=11 is more than the sampler's"),
    (lambda c: setattr(c.reasonx, 'sample_photos', 3), 'sample_photos=3 must divide'),
    (lambda c: setattr(c.reasonx, 'relation_weight', 0.0), 'no reward'),
    (lambda c: setattr(c.reasonx.thresholds, 'front', 1.5), 'reasonx.thresholds.front'),
    (lambda c: setattr(c, 'model', {}), "['model']: a reasonx config sets only"),
])
def test_config_errors_before_any_work(start, change, message):
  c = load_config_file('reasonx', 'demo')
  c.reasonx.start = str(start[0])
  c.reasonx.held_out = 'tfds:validation'
  c.data = {'data_dir': str(start[1])}
  change(c)
  with pytest.raises(ValueError, match=None) as e:
    reasonx.check(reasonx.full_config(c))
  assert message in str(e.value) and '\n' not in str(e.value)


def test_command_line_refuses_a_bad_start(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'layerjax.main', '--config=configs/reasonx.py:demo,start=' +
       str(tmp_path / 'none'), f'--workdir={tmp_path / "run"}'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1] == f'error: {tmp_path / "none"}: no such folder'
  assert not (tmp_path / 'run').exists()


# --- the photos and the readings the rewards use --------------------------------------------

def test_photo_folder_skips_what_it_cannot_use(tmp_path):
  """A readable photo with an object gets the detector's box; an unreadable file and a blank
  photo are skipped, each counted."""
  photo = np.full((32, 32, 3), 0.85, np.float32)
  photo[8:20, 10:24] = (0.1, 0.2, 0.8)
  from PIL import Image
  Image.fromarray((photo * 255).astype(np.uint8)).save(tmp_path / 'a.png')
  Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / 'blank.png')
  (tmp_path / 'broken.png').write_bytes(b'not a png')
  it = iter(photos.photo_stream(str(tmp_path), None, seed=0))
  got = [next(it) for _ in range(3)]
  found = [p for p in got if not isinstance(p, str)]
  assert len(found) == 1 and found[0].key == 'a.png' and found[0].truth is None
  x0, y0, x1, y1 = found[0].box
  assert x0 <= 10 and y0 <= 8 and x1 >= 24 and y1 >= 20  # it covers the object
  assert sorted(p for p in got if isinstance(p, str)) == ['no_prompt', 'unreadable']


def test_referent_is_the_object_the_box_overlaps():
  h = w = 16
  layers = [Layer('background', 'background', np.ones((h, w, 4), np.float32))]
  prompts = []
  for name, box in (('object_1', (0, 0, 8, 8)), ('object_2', (6, 6, 16, 16))):
    rgba = np.zeros((h, w, 4), np.float32)
    rgba[box[1]:box[3], box[0]:box[2]] = 1
    layers.append(Layer(name, 'object', rgba, bbox=box))
    prompts.append(Prompt(name, box=box))
  truth = LayeredSample('s', np.ones((h, w, 3), np.float32), layers, prompts)
  assert photos.referent(truth, (0, 0, 8, 9)) == 'object_1'  # IoU 64 / 72
  assert photos.referent(truth, (7, 7, 16, 16)) == 'object_2'  # IoU 81 / 100
  assert photos.referent(truth, (0, 0, 16, 16)) is None  # IoU 100 / 256 at most


def test_with_front_reads_what_hides_the_object():
  """The model's object spans columns 2..5; the photo shows it only in columns 2..3 (a red
  post covers columns 4..5): there the decomposition implies a hidden part."""
  photo = np.full((4, 8, 3), 0.5, np.float32)
  photo[:, 2:4] = (0, 0, 1)  # the object, blue
  photo[:, 4:6] = (1, 0, 0)  # something in front
  obj = np.zeros((4, 8, 4), np.float32)
  obj[:, 2:6] = (0, 0, 1, 1)
  background = np.full((4, 8, 3), 0.5, np.float32)
  background[:, 4:6] = (1, 0, 0)
  sample = relations.with_front(relations.one_object_sample('s', photo, background, obj, None,
                                                             'mug'), 'mug', Thresholds())
  answers = {x: (read(sample, Relation('on_object', ('mug',), (x, 1)), Thresholds()),
                 read(sample, Relation('hidden_part', ('mug',), (x, 1)), Thresholds()))
             for x in (1, 2, 3, 4, 5, 6)}
  assert answers == {1: ('no', 'no'), 2: ('yes', 'no'), 3: ('yes', 'no'), 4: ('no', 'yes'),
                     5: ('no', 'yes'), 6: ('no', 'no')}
  proposed = relations.propose(sample, np.random.default_rng(0), 20, objects=['mug'])
  assert proposed and all(rel.objects == ('mug',) for rel in proposed)
