"""The self-refining prompt loop (Gen-n-Val / TextGrad) with an LLM agent over a local
chat-completions server: a rewrite is kept only if it scores better on held-out items."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from chat_server import ChatServer, answer
from data_engine import core, refine
from data_engine.__main__ import main
from data_engine.prompts import DEFAULT_DIR, PromptStore

KEY_ENV = 'LAYERJAX_TEST_KEY'


@pytest.fixture
def server(monkeypatch):
  monkeypatch.setenv(KEY_ENV, 'k')
  with ChatServer() as s:
    yield s


@pytest.fixture
def prompts(tmp_path):
  root = tmp_path / 'prompts'
  shutil.copytree(DEFAULT_DIR, root, ignore=shutil.ignore_patterns('*.py', '__pycache__'))
  return root


@pytest.fixture
def items(tmp_path):
  """Four objects, all valid: whether an answer is right depends only on the script."""
  lines = []
  for i in range(4):
    alpha = np.zeros((16, 16), np.uint8)
    alpha[4:12, 4:12] = 255
    rgba = np.dstack([np.full((16, 16, 3), 60 * i, np.uint8), alpha])
    Image.fromarray(rgba, 'RGBA').save(tmp_path / f'obj{i}.png')
    lines.append(json.dumps({'image': f'obj{i}.png', 'expected': True}))
  (tmp_path / 'items.jsonl').write_text('\n'.join(lines) + '\n')
  return tmp_path / 'items.jsonl'


def _verdict(keep: bool):
  return answer({'description': 'a square', 'single_object': True, 'single_view': True,
                 'intact': True, 'plain_background': True, 'reason': 'looks fine',
                 'keep': keep})


def _backend(server) -> dict:
  return {'name': 'openai', 'base_url': server.url, 'model': 'm', 'api_key_env': KEY_ENV,
          'timeout': 5.0, 'max_retries': 0}


def _system_prompts(server) -> list[str]:
  return [r.body['messages'][0]['content'] for r in server.requests]


def test_a_better_rewrite_becomes_the_next_version(server, prompts, items):
  agent = core.create('agent', {'name': 'llm', 'backend': _backend(server),
                                'prompts_dir': str(prompts)})
  data = refine.read_items(items)
  server.push(_verdict(False), _verdict(False),            # held-out under v1: 0 / 2
              _verdict(False), _verdict(True),             # train under v1: one wrong
              answer({'critique': 'it rejects intact single objects'}),
              answer({'prompt': 'Keep every intact single object.'}),
              _verdict(True), _verdict(True),              # held-out under the rewrite: 2 / 2
              _verdict(True), _verdict(True))              # train under v2: nothing wrong
  result = refine.refine('validate_object', agent.store,
                         lambda text, v: agent.with_prompt('validate_object', text, v),
                         agent, agent, data[:2], data[2:], rounds=3)
  assert result['version'] == 'v2' and result['heldout_accuracy'] == 1.0
  store = PromptStore(prompts)
  assert store.load('validate_object') == ('Keep every intact single object.', 'v2')
  first, second = result['rounds']
  assert first['accepted'] and first['candidate_accuracy'] == 1.0 and first['new_version'] == 'v2'
  assert first['train_accuracy'] == 0.5 and first['heldout_accuracy'] == 0.0
  assert second['outcome'] == 'nothing to correct' and second['version'] == 'v2'
  # The critique saw the wrong answer; the rewrite saw the critique and the old prompt.
  critique_text = server.requests[4].body['messages'][1]['content'][0]['text']
  shown = json.loads(critique_text.split('Examples:\n', 1)[1])
  assert [(e['output'], e['expected']) for e in shown] == [(False, True)]
  v1 = store.load('validate_object', 'v1')[0].strip()
  assert v1 in server.requests[5].body['messages'][1]['content'][0]['text']
  systems = _system_prompts(server)
  assert systems[:4] == [v1] * 4
  assert systems[6:] == ['Keep every intact single object.'] * 4
  log = [json.loads(l) for l in (prompts / 'refine_log.jsonl').read_text().splitlines()]
  assert log == result['rounds']


def test_a_rewrite_that_is_no_better_is_not_stored(server, prompts, items):
  agent = core.create('agent', {'name': 'llm', 'backend': _backend(server),
                                'prompts_dir': str(prompts)})
  data = refine.read_items(items)
  server.push(_verdict(True), _verdict(False),             # held-out under v1: 1 / 2
              _verdict(False), _verdict(False),            # train: both wrong
              answer({'critique': 'too strict'}), answer({'prompt': 'Reject everything.'}),
              _verdict(False), _verdict(True))             # held-out: 1 / 2, not better
  result = refine.refine('validate_object', agent.store,
                         lambda text, v: agent.with_prompt('validate_object', text, v),
                         agent, agent, data[:2], data[2:], rounds=1)
  assert result['version'] == 'v1' and not result['rounds'][0]['accepted']
  assert PromptStore(prompts).versions('validate_object') == ['v1']


def test_cli_refines_with_the_configured_agent(server, prompts, items, capsys):
  server.push(_verdict(False), _verdict(False), _verdict(False), _verdict(True),
              answer({'critique': 'be lenient'}), answer({'prompt': 'Be lenient.'}),
              _verdict(True), _verdict(True))
  agent = {'name': 'llm', 'backend': _backend(server), 'prompts_dir': str(prompts)}
  assert main(['refine-prompt', '--task', 'validate_object', '--items', str(items),
               '--set', f'agent={agent!r}', '--set', 'refine.rounds=1']) == 0
  result = json.loads(capsys.readouterr().out)
  assert result['version'] == 'v2' and result['rounds'][0]['accepted']
  assert main(['refine-prompt', '--task', 'validate_object', '--items', str(items)]) == 2
  assert 'no system prompts to refine' in capsys.readouterr().err
  assert main(['refine-prompt', '--task', 'validate_object', '--items', str(items),
               '--set', f'agent={agent!r}', '--set',
               "refine.evaluator={'name': 'rule_based'}"]) == 2
  assert 'refine.evaluator: a RuleBasedAgent cannot criticise' in capsys.readouterr().err


def test_items_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.jsonl'):
    refine.read_items(tmp_path / 'nope.jsonl')
  (tmp_path / 'bad.jsonl').write_text('{"image": "a.png"}\n')
  with pytest.raises(ValueError, match='bad.jsonl:1: an item needs an "expected"'):
    refine.read_items(tmp_path / 'bad.jsonl')
