"""Agents: the rule-based agent's new methods, the LLM agent through the real `openai` client
against a local chat-completions server (answers, garbage, timeouts, rate limits, server
errors, servers without response_format), a tiny random local VLM, and the prompt store."""

import base64
import io
import json
import os
import shutil
import socket
import time

import numpy as np
import pytest
from PIL import Image

from chat_server import ChatServer, answer, error, slow
from data_engine import core
from data_engine.agents import (Agent, Judgement, LLMAgent, Preference, PromptOptimiser,
                                RuleBasedAgent)
from data_engine.agents.chat import (OpenAIChat, TransformersVLM, image_part, parse_json,
                                     retry_after, validate)
from data_engine.agents.llm import SCHEMAS, TASKS, over_checkerboard
from data_engine.core import Drop
from data_engine.prompts import DEFAULT_DIR, PromptStore
from data_engine.tools.captioner import Template
from data_engine.tools.types import Caption, Detection
from layerjax.data import schema
from layerjax.data.schema import Layer

S = 32
HALF_STEP = 0.5 / 255 + 1e-6  # PNG quantisation
KEY_ENV = 'TEST_ENGINE_AGENT_KEY'


# --- inputs -------------------------------------------------------------------------------

def _photo() -> np.ndarray:
  ys, xs = np.mgrid[:S, :S] / (S - 1)
  photo = np.stack([ys, xs, 0.5 * np.ones_like(xs)], -1).astype(np.float32)
  photo[8:20, 10:22] = (0.9, 0.1, 0.1)  # a red box
  return photo


def _box_mask() -> np.ndarray:
  mask = np.zeros((S, S), bool)
  mask[8:20, 10:22] = True
  return mask


def _rgba(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  return np.concatenate([rgb, alpha[..., None]], -1).astype(np.float32)


def _sample(photo: np.ndarray, removed: bool):
  """Background + one object; `removed`: whether the background lost the object."""
  mask = _box_mask()
  background = photo.copy()
  if removed:
    background[mask] = photo[7, 10]  # filled from the row above
  layers = [Layer('background', 'background', _rgba(background, np.ones((S, S)))),
            Layer('object_1', 'object', _rgba(photo, mask.astype(np.float32)), label='box')]
  return schema.assemble('s', layers)


def _disk(cy: float, cx: float, r: float) -> np.ndarray:
  ys, xs = np.mgrid[:S, :S]
  return ((ys - cy) ** 2 + (xs - cx) ** 2 <= r * r).astype(np.float32)


def _layer_rgba(alpha: np.ndarray, rgb=(0.2, 0.4, 0.9)) -> np.ndarray:
  return _rgba(np.broadcast_to(np.float32(rgb), (S, S, 3)), alpha)


def _decode(part: dict) -> np.ndarray:
  url = part['image_url']['url']
  assert url.startswith('data:image/png;base64,')
  with Image.open(io.BytesIO(base64.b64decode(url.split(',', 1)[1]))) as im:
    assert im.format == 'PNG'
    return np.asarray(im, np.float32) / 255


# --- rule-based agent ---------------------------------------------------------------------

def test_rule_based_validate_object_accepts_one_blob_only():
  agent = RuleBasedAgent()
  assert agent.validate_object(_layer_rgba(_disk(16, 16, 7))) == \
      Judgement(1.0, 'one intact object on a transparent background')
  two = agent.validate_object(_layer_rgba(_disk(10, 9, 5) + _disk(21, 22, 5)))
  assert two.score == 0.0 and two.reason == '2 separate parts; the largest holds 50% of the opacity'
  cut = agent.validate_object(_layer_rgba(_disk(16, 2, 7)))
  assert cut.score == 0.0 and cut.reason == 'the object is cut by the image border'
  haze = agent.validate_object(_layer_rgba(np.maximum(_disk(16, 16, 7), 0.1)))
  assert haze.score == 0.0
  assert haze.reason.startswith('background not transparent (mean alpha 0.100')
  empty = agent.validate_object(_layer_rgba(np.zeros((S, S))))
  assert empty.score == 0.0 and empty.reason.startswith('no object')
  # A speck beside the object holds little of the opacity: still one object.
  speck = _disk(16, 16, 7)
  speck[2, 2] = 1
  assert agent.validate_object(_layer_rgba(speck)).score == 1.0


def test_rule_based_validate_object_on_opaque_images():
  agent = RuleBasedAgent()
  plain = np.ones((S, S, 3), np.float32)
  plain[_disk(16, 16, 7) > 0] = (0.9, 0.1, 0.1)
  assert agent.validate_object(_rgba(plain, np.ones((S, S)))) == \
      Judgement(1.0, 'one intact object on a plain background')
  busy = np.random.default_rng(0).random((S, S, 3)).astype(np.float32)
  result = agent.validate_object(_rgba(busy, np.ones((S, S))))
  assert result.score == 0.0 and 'background is neither transparent nor plain' in result.reason


def test_rule_based_compare_prefers_the_better_decomposition():
  agent = RuleBasedAgent()
  photo = _photo()
  good, bad = _sample(photo, removed=True), _sample(photo, removed=False)
  assert agent.judge(photo, good).score == 1.0
  assert agent.judge(photo, bad).score == pytest.approx(2 / 3)
  pref = agent.compare(photo, good, bad)
  assert (pref.winner, pref.scores) == ('a', (1.0, pytest.approx(2 / 3)))
  assert pref.reason == 'a 1.00 (all checks passed); b 0.67 (object_1 removed (0.00))'
  assert agent.compare(photo, bad, good).winner == 'b'
  assert agent.compare(photo, good, good) == Preference('tie', pref.reason.replace(
      'b 0.67 (object_1 removed (0.00))', 'b 1.00 (all checks passed)'), (1.0, 1.0))


def test_rule_based_caption_prompts_and_no_prompt_optimisation():
  agent = RuleBasedAgent()
  rgba = _layer_rgba(_disk(16, 6, 5), rgb=(0.8, 0.1, 0.1))
  assert agent.caption(rgba, 'ball') == Template()(rgba, 'ball')
  assert agent.caption(rgba, 'ball').caption == 'a red ball'
  prompts = agent.write_prompts('teapot', 5)
  assert len(set(prompts)) == 5 and all('a single teapot' in p for p in prompts)
  assert prompts == RuleBasedAgent().write_prompts('teapot', 5)  # seeded
  assert prompts != RuleBasedAgent(seed=1).write_prompts('teapot', 5)
  with pytest.raises(ValueError, match='n=126'):
    agent.write_prompts('teapot', 126)
  assert agent.prompt_versions() == {}
  assert isinstance(agent, Agent) and not isinstance(agent, PromptOptimiser)


# --- answer parsing -----------------------------------------------------------------------

CHECK = SCHEMAS['check_text']


def test_parse_json_bare_fenced_and_in_prose():
  good = {'reason': 'red as captioned', 'agrees': True}
  assert parse_json(json.dumps(good), CHECK) == good
  assert parse_json(f'Here you go:\n```json\n{json.dumps(good)}\n```\nBye', CHECK) == good
  prose = f'I think {{so}}. The answer is {json.dumps({**good, "reason": "a {brace} in text"})}.'
  assert parse_json(prose, CHECK)['reason'] == 'a {brace} in text'
  # An example object that does not follow the schema is skipped for the real answer.
  assert parse_json(f'Format: {{"x": 1}}. Answer: {json.dumps(good)}', CHECK) == good


@pytest.mark.parametrize('text, why', [
    ('no JSON here', 'no JSON object'),
    ('[1, 2]', 'no JSON object'),
    ('{"reason": "x"}', "answer lacks 'agrees'"),
    ('{"reason": "x", "agrees": "yes"}', 'answer.agrees should be boolean'),
    ('{"reason": "", "agrees": true}', 'answer.reason is shorter than 1 characters'),
    ('{"reason": "x", "agrees": tru', 'no JSON object'),
])
def test_parse_json_garbage(text, why):
  with pytest.raises(Drop) as e:
    parse_json(text, CHECK)
  assert e.value.reason == 'agent_garbage'
  assert e.value.detail.startswith(why) and repr(text[:300]) in e.value.detail


def test_validate_schema_subset():
  s = {'type': 'object', 'required': ['n', 'xs'], 'properties': {
      'n': {'type': 'integer', 'minimum': 1, 'maximum': 5},
      'xs': {'type': 'array', 'minItems': 2, 'maxItems': 3, 'items': {'enum': ['a', 'b']}}}}
  assert validate({'n': 3.0, 'xs': ['a', 'b'], 'extra': 1}, s) == []
  assert validate({'n': True, 'xs': ['a', 'c']}, s) == [
      'answer.n should be integer, got bool true',
      "answer.xs[1] should be one of ['a', 'b'], got 'c'"]
  assert validate({'n': 9, 'xs': ['a']}, s) == [
      'answer.n = 9 > maximum 5', 'answer.xs has 1 items, fewer than 2']
  assert validate({'n': 2, 'xs': ['a'] * 4}, s) == ['answer.xs has 4 items, more than 3']
  assert validate(float('nan'), {'type': 'number'}) == ['answer is not finite']
  with pytest.raises(ValueError, match='unsupported schema keywords'):
    validate({}, {'type': 'object', 'patternProperties': {}})


def test_retry_after_headers():
  assert retry_after({'retry-after-ms': '250'}) == 0.25
  assert retry_after({'retry-after': '2'}) == 2.0
  date = time.strftime('%a, %d %b %Y %H:%M:%S GMT', time.gmtime(time.time() + 30))
  assert 28 <= retry_after({'retry-after': date}) <= 30
  assert retry_after({'retry-after': 'soon'}) is None
  assert retry_after({}) is None


# --- LLM agent over the HTTP backend ------------------------------------------------------

@pytest.fixture
def server(monkeypatch):
  monkeypatch.setenv(KEY_ENV, 'secret-key')
  with ChatServer() as s:
    yield s


def _spec(server, **options) -> dict:
  return {'name': 'openai', 'base_url': server.url, 'model': 'test-vlm', 'api_key_env': KEY_ENV,
          'timeout': 2.0, 'max_retries': 2, 'backoff': 0.01, **options}


def _agent(server, **options) -> LLMAgent:
  return core.create('agent', {'name': 'llm', 'backend': _spec(server, **options)})


def _system(task: str) -> str:
  return (DEFAULT_DIR / task / 'v1.txt').read_text().strip()


def _check_request(request, task: str, schema_sent: bool = True) -> list[dict]:
  """Checks what every request carries; returns the user message's content parts."""
  assert request.path == '/v1/chat/completions'
  assert request.headers['authorization'] == 'Bearer secret-key'
  body = request.body
  assert body['model'] == 'test-vlm' and body['temperature'] == 0.0
  system, user = body['messages']
  assert system == {'role': 'system', 'content': _system(task)}
  assert user['role'] == 'user'
  schema_note = user['content'][-1]['text']
  assert schema_note.startswith('Answer with one JSON object') and schema_note.endswith(
      json.dumps(body['response_format']['json_schema']['schema'] if schema_sent
                 else SCHEMAS.get(task, {})))
  if schema_sent:
    assert body['response_format']['type'] == 'json_schema'
    assert body['response_format']['json_schema']['name'] == task
  else:
    assert 'response_format' not in body
  return user['content'][:-1]


def test_llm_judge_end_to_end(server):
  agent = _agent(server)
  photo = _photo()
  sample = _sample(photo, removed=True)
  server.push(answer({'reason': 'clean fill, crisp edges', 'background': 5, 'objects': 4,
                      'alpha': 3}))
  judgement = agent.judge(photo, sample)
  assert judgement.score == 0.5  # the worst aspect, 3/5, on [0, 1]
  assert judgement.reason == ('clean fill, crisp edges (background 5/5, objects 4/5, alpha 3/5; '
                              'judge/v1)')
  (request,) = server.requests
  content = _check_request(request, 'judge')
  assert request.body['response_format']['json_schema']['schema'] == SCHEMAS['judge']
  texts = [p['text'] for p in content if p['type'] == 'text']
  assert texts == ['Original photo:', 'layer background (background):',
                   "layer object_1 (object, label 'box'):"]
  images = [_decode(p) for p in content if p['type'] == 'image_url']
  np.testing.assert_allclose(images[0], photo, atol=HALF_STEP)
  np.testing.assert_allclose(images[1], sample.layers[0].rgba[..., :3], atol=HALF_STEP)
  np.testing.assert_allclose(images[2], over_checkerboard(sample.layers[1].rgba),
                             atol=HALF_STEP)
  assert agent.prompt_versions() == {task: 'v1' for task in TASKS}


def test_llm_plan_check_text_caption(server):
  agent = _agent(server)
  photo = _photo()
  server.push(answer({'labels': ['red box'], 'reason': 'the box shadows the floor',
                      'shadows': True}),
              answer({'reason': 'it is red', 'agrees': True}),
              answer({'label': 'box', 'caption': 'a red box', 'referring': ['the red box']}))
  plan = agent.plan(photo, [Detection((10, 8, 22, 20), 0.876543, 'box')])
  assert plan == {'shadows': True, 'reason': 'the box shadows the floor', 'labels': ['red box'],
                  'prompt_version': 'plan/v1'}
  plan_parts = _check_request(server.requests[0], 'plan')
  assert plan_parts[1]['text'] == ('Photo size: 32x32 pixels.\nDetections: '
                                   '[{"box": [10, 8, 22, 20], "score": 0.877, "label": "box"}]')
  layer = _sample(photo, removed=True).layers[1]
  layer.caption, layer.referring = 'a red box', ('the red box',)
  assert agent.check_text(layer) == (True, 'it is red (check_text/v1)')
  parts = _check_request(server.requests[1], 'check_text')
  assert json.loads(parts[1]['text'].removeprefix('Texts: ')) == {
      'label': 'box', 'caption': 'a red box', 'referring': ['the red box']}
  assert agent.check_text(_sample(photo, True).layers[0]) == (True, '')  # background: no call
  assert agent.caption(layer.rgba, 'box') == Caption('box', 'a red box', ('the red box',))
  parts = _check_request(server.requests[2], 'caption')
  np.testing.assert_allclose(_decode(parts[0]), over_checkerboard(layer.rgba), atol=HALF_STEP)
  assert parts[1]['text'] == "Suggested label: 'box'"
  assert len(server.requests) == 3


def test_llm_compare_and_validate_object(server):
  agent = _agent(server)
  photo = _photo()
  good, bad = _sample(photo, True), _sample(photo, False)
  server.push(answer({'reason': 'B left the box in the background', 'score_a': 5, 'score_b': 2,
                      'winner': 'a'}),
              answer({'reason': 'A is worse', 'score_a': 2, 'score_b': 4, 'winner': 'a'}),
              answer({'description': 'a blue disk', 'single_object': True, 'single_view': True,
                      'intact': True, 'plain_background': True, 'reason': 'all met',
                      'keep': True}),
              answer({'description': 'two disks', 'single_object': False, 'single_view': True,
                      'intact': True, 'plain_background': True, 'reason': 'two objects',
                      'keep': False}))
  pref = agent.compare(photo, good, bad)
  assert pref == Preference('a', 'B left the box in the background (a 5/5, b 2/5; compare/v1)',
                            (1.0, 0.25))
  texts = [p['text'] for p in _check_request(server.requests[0], 'compare') if p['type'] == 'text']
  assert texts[1:] == ['Decomposition A, layer background (background):',
                       "Decomposition A, layer object_1 (object, label 'box'):",
                       'Decomposition B, layer background (background):',
                       "Decomposition B, layer object_1 (object, label 'box'):"]
  with pytest.raises(Drop) as e:  # the winner contradicts the scores
    agent.compare(photo, good, bad)
  assert e.value.reason == 'agent_garbage' and 'contradicts' in e.value.detail
  valid = agent.validate_object(_layer_rgba(_disk(16, 16, 7)), 'disk')
  assert valid.score == 1.0 and valid.reason == 'kept: all met (validate_object/v1)'
  assert _check_request(server.requests[2], 'validate_object')[1]['text'] == \
      'Expected category: disk'
  invalid = agent.validate_object(_layer_rgba(_disk(10, 9, 5) + _disk(21, 22, 5)))
  assert invalid.score == 0.0
  assert invalid.reason == 'rejected (failed: single_object): two objects (validate_object/v1)'


def test_llm_prompt_writing_and_optimisation(server):
  agent = _agent(server)
  server.push(answer({'prompts': ['a photo of a single red teapot', 'a teapot, side view',
                                  'extra one']}),
              answer({'prompts': ['only one']}),
              answer({'critique': 'The validator accepts hazy backgrounds.'}),
              answer({'prompt': 'You validate objects. Reject hazy backgrounds.'}))
  assert agent.write_prompts('teapot', 2) == ['a photo of a single red teapot',
                                              'a teapot, side view']
  request = server.requests[0]
  _check_request(request, 'write_prompts')
  assert request.body['response_format']['json_schema']['schema']['properties']['prompts'][
      'minItems'] == 2
  with pytest.raises(Drop, match='fewer than 2'):
    agent.write_prompts('teapot', 2)
  assert agent.write_prompts('teapot', 0) == []  # no request
  examples = [{'input': 'hazy disk', 'output': {'keep': True}, 'expected': {'keep': False}}]
  assert agent.critique('validate_object', examples) == 'The validator accepts hazy backgrounds.'
  parts = _check_request(server.requests[2], 'critique')
  assert parts[0]['text'] == f'Task: validate_object\nExamples:\n{json.dumps(examples, indent=1)}'
  assert agent.rewrite_prompt('validate_object', 'You validate objects.',
                              ['accepts hazy backgrounds']) == \
      'You validate objects. Reject hazy backgrounds.'
  parts = _check_request(server.requests[3], 'rewrite_prompt')
  assert parts[0]['text'] == ('Task: validate_object\nCurrent system prompt:\n<<<\nYou validate '
                              'objects.\n>>>\nCritiques:\n- accepts hazy backgrounds')
  assert len(server.requests) == 4


@pytest.mark.parametrize('text, why', [
    ('The decomposition looks fine to me.', 'no JSON object'),
    ('{"reason": "ok", "background": "five", "objects": 4, "alpha": 4}',
     'answer.background should be integer'),
    ('{"reason": "ok", "background": 7, "objects": 4, "alpha": 4}',
     'answer.background = 7 > maximum 5'),
    (None, 'test-vlm: no answer text'),
])
def test_llm_malformed_answers_drop(server, text, why):
  agent = _agent(server)
  server.push(answer(text))
  photo = _photo()
  with pytest.raises(Drop) as e:
    agent.judge(photo, _sample(photo, True))
  assert e.value.reason == 'agent_garbage'
  assert e.value.detail.startswith(f'judge/v1: {why}')
  assert len(server.requests) == 1  # garbage is not retried


def test_llm_fenced_and_prose_answers(server):
  agent = _agent(server)
  body = json.dumps({'reason': 'fine', 'agrees': False})
  server.push(answer(f'```json\n{body}\n```'), answer(f'Let me look. {body} Hope that helps!'))
  layer = _sample(_photo(), True).layers[1]
  assert agent.check_text(layer) == (False, 'fine (check_text/v1)')
  assert agent.check_text(layer) == (False, 'fine (check_text/v1)')


# --- retries ------------------------------------------------------------------------------

GOOD = {'reason': 'ok', 'agrees': True}


def _ask(backend) -> dict:
  messages = [{'role': 'system', 'content': 'check'}, {'role': 'user', 'content': 'hi'}]
  return parse_json(backend.complete(messages, CHECK), CHECK)


def _gaps(server) -> list[float]:
  times = [r.time for r in server.requests]
  return [b - a for a, b in zip(times, times[1:])]


def test_timeout_is_retried_then_succeeds_or_drops(server):
  backend = core.create('chat', _spec(server, timeout=1.0, max_retries=1))
  server.push(slow(3.0, GOOD), answer(GOOD))
  assert _ask(backend) == GOOD
  assert len(server.requests) == 2
  server.push(slow(3.0, GOOD), slow(3.0, GOOD))
  with pytest.raises(Drop) as e:
    _ask(backend)
  assert e.value.reason == 'agent_timeout'
  assert 'APITimeoutError' in e.value.detail and 'after 2 attempts' in e.value.detail
  assert len(server.requests) == 4


def _waits(caplog) -> list[str]:
  messages = [r.getMessage() for r in caplog.records]
  return [m.rsplit(' in ', 1)[1] for m in messages if ' retry ' in m]


def test_server_errors_back_off_exponentially(server, caplog):
  backend = core.create('chat', _spec(server, backoff=0.1))
  server.push(error(500), error(503), answer(GOOD))
  assert _ask(backend) == GOOD
  assert _waits(caplog) == ['0.10 s', '0.20 s']
  first, second = _gaps(server)
  assert first >= 0.1 and second >= 0.2
  server.push(error(500), error(502), error(500))
  with pytest.raises(Drop) as e:
    _ask(backend)
  assert e.value.reason == 'agent_unavailable' and 'after 3 attempts' in e.value.detail
  assert len(server.requests) == 6


def test_rate_limit_honours_retry_after(server, caplog):
  backend = core.create('chat', _spec(server, max_retries=2, max_wait=5.0))
  server.push(error(429, retry_after_ms='300'), answer(GOOD))
  assert _ask(backend) == GOOD
  assert _gaps(server)[0] >= 0.3 and _waits(caplog) == ['0.30 s']
  server.push(error(429), error(429), error(429))  # no Retry-After: exponential backoff
  with pytest.raises(Drop) as e:
    _ask(backend)
  assert _waits(caplog) == ['0.30 s', '0.01 s', '0.02 s']
  assert e.value.reason == 'agent_rate_limited' and len(server.requests) == 5
  server.push(error(429, retry_after='120'))  # longer than max_wait: give up at once
  with pytest.raises(Drop) as e:
    _ask(backend)
  assert e.value.reason == 'agent_rate_limited' and 'max_wait 5.0 s' in e.value.detail
  assert len(server.requests) == 6


def test_client_errors_and_unreachable_servers_drop(server):
  backend = core.create('chat', _spec(server))
  server.push(error(401, 'bad key'))
  with pytest.raises(Drop) as e:
    _ask(backend)
  assert e.value.reason == 'agent_error' and 'bad key' in e.value.detail
  assert len(server.requests) == 1  # not retried
  with socket.socket() as s:  # a port nobody listens on
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  down = OpenAIChat(f'http://127.0.0.1:{port}/v1', 'test-vlm', max_retries=1, backoff=0.01)
  with pytest.raises(Drop) as e:
    _ask(down)
  assert e.value.reason == 'agent_unavailable' and 'APIConnectionError' in e.value.detail


def test_rejected_response_format_falls_back_once_and_is_remembered(monkeypatch):
  monkeypatch.setenv(KEY_ENV, 'secret-key')
  with ChatServer(reject_response_format=True) as server:
    agent = _agent(server)
    layer = _sample(_photo(), True).layers[1]
    server.push(answer(GOOD), answer(GOOD))
    assert agent.check_text(layer) == (True, 'ok (check_text/v1)')
    assert ['response_format' in r.body for r in server.requests] == [True, False]
    _check_request(server.requests[1], 'check_text', schema_sent=False)  # schema in the prompt
    assert agent.backend.json_schema is False
    assert agent.check_text(layer) == (True, 'ok (check_text/v1)')
    assert len(server.requests) == 3 and 'response_format' not in server.requests[2].body


def test_a_400_unrelated_to_response_format_is_an_error(server):
  backend = core.create('chat', _spec(server))
  server.push(error(400, 'image too large'), error(400, 'image too large'))
  with pytest.raises(Drop) as e:
    _ask(backend)
  assert e.value.reason == 'agent_error' and 'image too large' in e.value.detail
  assert ['response_format' in r.body for r in server.requests] == [True, False]
  assert backend.json_schema is True  # the plain request failed too: nothing learnt


def test_backend_and_agent_configuration_errors(server, tmp_path):
  with pytest.raises(ValueError, match='base_url and model are required'):
    core.create('chat', {'name': 'openai', 'base_url': '', 'model': 'm'})
  with pytest.raises(ValueError, match="unknown chat 'nope'"):
    LLMAgent({'name': 'nope'})
  with pytest.raises(ValueError, match='unknown tasks'):
    LLMAgent(_spec(server), versions={'judg': 'v1'})
  with pytest.raises(FileNotFoundError, match='no prompt for task'):
    LLMAgent(_spec(server), prompts_dir=str(tmp_path))
  llm = LLMAgent(_spec(server))
  assert isinstance(llm, Agent) and isinstance(llm, PromptOptimiser)


def test_image_part_shrinks_and_encodes_png():
  image = np.random.default_rng(0).random((40, 80, 4)).astype(np.float32)
  decoded = _decode(image_part(image, max_side=20))
  assert decoded.shape == (10, 20, 4)
  np.testing.assert_allclose(_decode(image_part(image)), image, atol=HALF_STEP)


# --- prompt store -------------------------------------------------------------------------

def test_shipped_prompts_cover_every_task():
  store = PromptStore()
  for task in TASKS:
    text, version = store.load(task)
    assert version == 'v1' and len(text) > 200


def test_prompt_store_versions_are_never_overwritten(tmp_path):
  store = PromptStore(tmp_path)
  assert store.save('judge', 'first') == 'v1'
  assert store.save('judge', 'second') == 'v2'
  assert store.load('judge') == ('second', 'v2')
  assert store.load('judge', 'v1') == ('first', 'v1')
  (tmp_path / 'judge' / 'v10.txt').write_text('tenth')  # numeric, not lexical, order
  assert store.versions('judge') == ['v1', 'v2', 'v10'] and store.latest('judge') == 'v10'
  assert store.save('judge', 'eleventh') == 'v11'
  # Another writer takes v12 between our listing and our write: we take v13.
  listing, calls = store.versions, []

  def racing(task):  # the first listing misses the other writer's v12
    calls.append(task)
    if len(calls) > 1:
      return listing(task)
    (tmp_path / 'judge' / 'v12.txt').write_text('theirs')
    return listing(task)[:-1]
  store.versions = racing
  assert store.save('judge', 'ours') == 'v13'
  assert store.load('judge', 'v12')[0] == 'theirs' and store.load('judge', 'v13')[0] == 'ours'
  assert sorted(p.name for p in (tmp_path / 'judge').iterdir()) == [
      'v1.txt', 'v10.txt', 'v11.txt', 'v12.txt', 'v13.txt', 'v2.txt']


def test_prompt_store_save_is_atomic_and_checks_names(tmp_path, monkeypatch):
  store = PromptStore(tmp_path)
  store.save('plan', 'one')

  def fail(fd):
    raise OSError('disk full')
  monkeypatch.setattr(os, 'fsync', fail)
  with pytest.raises(OSError, match='disk full'):
    store.save('plan', 'two')
  assert sorted(p.name for p in (tmp_path / 'plan').iterdir()) == ['v1.txt']  # no part, no temp
  with pytest.raises(ValueError, match='bad task name'):
    store.load('../plan')
  with pytest.raises(ValueError, match='bad version'):
    store.load('plan', 'latest')
  with pytest.raises(FileNotFoundError, match=r"versions of 'plan': \['v1'\]"):
    store.load('plan', 'v7')
  with pytest.raises(ValueError, match='empty prompt'):
    store.save('plan', '  \n')


def test_agent_uses_pinned_prompt_versions(server, tmp_path):
  prompts = tmp_path / 'prompts'
  shutil.copytree(DEFAULT_DIR, prompts, ignore=shutil.ignore_patterns('*.py', '__pycache__'))
  store = PromptStore(prompts)
  assert store.save('check_text', 'You check texts, strictly.') == 'v2'
  pinned = LLMAgent(_spec(server), prompts_dir=str(prompts), versions={'check_text': 'v1'})
  latest = LLMAgent(_spec(server), prompts_dir=str(prompts))
  assert pinned.prompt_versions()['check_text'] == 'v1'
  assert latest.prompt_versions()['check_text'] == 'v2'
  server.push(answer(GOOD), answer(GOOD))
  layer = _sample(_photo(), True).layers[1]
  assert pinned.check_text(layer) == (True, 'ok (check_text/v1)')
  assert latest.check_text(layer) == (True, 'ok (check_text/v2)')
  systems = [r.body['messages'][0]['content'] for r in server.requests]
  assert systems == [_system('check_text'), 'You check texts, strictly.']
  with pytest.raises(FileNotFoundError, match='v9'):
    LLMAgent(_spec(server), prompts_dir=str(prompts), versions={'judge': 'v9'})


# --- local VLM ----------------------------------------------------------------------------

def _vlm_messages() -> list[dict]:
  rgba = _layer_rgba(_disk(16, 16, 7))
  return [{'role': 'system', 'content': 'You check texts.'},
          {'role': 'user', 'content': [image_part(over_checkerboard(rgba)),
                                       {'type': 'text', 'text': 'Texts: a blue disk'}]}]


def test_transformers_vlm_matches_the_model_run_directly(tiny_vlm):
  import torch
  from transformers import AutoModelForImageTextToText, AutoProcessor
  backend = core.create('chat', {'name': 'transformers', 'path': str(tiny_vlm),
                                 'max_new_tokens': 12})
  assert backend.device == 'cpu' and backend.model.dtype == torch.float32
  text = backend.complete(_vlm_messages(), CHECK)
  assert text == backend.complete(_vlm_messages(), CHECK)  # greedy: reproducible
  # Reference: the processor called on the rendered prompt and the image, and generate.
  processor = AutoProcessor.from_pretrained(tiny_vlm, local_files_only=True)
  model = AutoModelForImageTextToText.from_pretrained(tiny_vlm, local_files_only=True,
                                                      use_safetensors=True).eval()
  note = ('Answer with one JSON object and nothing else. It must follow this JSON schema:\n'
          + json.dumps(CHECK))
  prompt = ('<|system|>You check texts.\n<|user|><image>Texts: a blue disk' + note +
            '\n<|assistant|>')
  image = Image.open(io.BytesIO(base64.b64decode(
      _vlm_messages()[1]['content'][0]['image_url']['url'].split(',', 1)[1]))).convert('RGB')
  inputs = processor(text=prompt, images=[image], return_tensors='pt')
  with torch.no_grad():
    out = model.generate(**inputs, do_sample=False, max_new_tokens=12)
  expected = processor.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True)
  assert text == expected and text


def test_transformers_vlm_past_its_timeout_gives_no_answer(tiny_vlm):
  backend = core.create('chat', {'name': 'transformers', 'path': str(tiny_vlm),
                                 'max_new_tokens': 400, 'timeout': 1e-6})
  with pytest.raises(Drop) as e:
    backend.complete(_vlm_messages(), CHECK)
  assert e.value.reason == 'agent_timeout' and 'within 1e-06 s' in e.value.detail


def test_llm_agent_on_a_local_vlm_handles_random_output(tiny_vlm):
  agent = LLMAgent({'name': 'transformers', 'path': str(tiny_vlm), 'max_new_tokens': 12})
  layer = _sample(_photo(), True).layers[1]
  outcomes = []
  for _ in range(2):
    try:
      outcomes.append(agent.check_text(layer))
    except Drop as drop:  # a random model rarely writes valid JSON
      assert drop.reason == 'agent_garbage' and drop.detail.startswith('check_text/v1: ')
      outcomes.append(drop.detail)
  assert outcomes[0] == outcomes[1]


def test_transformers_vlm_configuration_errors(tiny_vlm, tmp_path):
  missing = f'chat transformers: weights folder {tmp_path}/nope does not exist'
  with pytest.raises(FileNotFoundError, match=missing):
    TransformersVLM(str(tmp_path / 'nope'))
  text_only = tmp_path / 'llama'
  text_only.mkdir()
  (text_only / 'config.json').write_text(json.dumps({'model_type': 'llama'}))
  wrong_type = "chat transformers: .* has model_type 'llama', expected one of .*'llava'"
  with pytest.raises(ValueError, match=wrong_type):
    LLMAgent({'name': 'transformers', 'path': str(text_only)})
  no_weights = tmp_path / 'no_weights'
  no_weights.mkdir()
  shutil.copy(tiny_vlm / 'config.json', no_weights)
  with pytest.raises(FileNotFoundError, match='chat transformers: .* has no .safetensors weights'):
    TransformersVLM(str(no_weights))
  with pytest.raises(FileNotFoundError, match=f'chat transformers: {tmp_path} has no config.json'):
    TransformersVLM(str(tmp_path))
  no_processor = tmp_path / 'no_processor'
  no_processor.mkdir()
  for name in ('config.json', 'model.safetensors'):
    shutil.copy(tiny_vlm / name, no_processor)
  with pytest.raises(ValueError, match=f'chat transformers: cannot load {no_processor}'):
    TransformersVLM(str(no_processor))
