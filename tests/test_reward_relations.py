"""Judge rewards (layerjax.reward): relations read from hand-made decompositions, where they
are proposed, the agreement reward, the ground-truth judge, and the agent judge through the
real `openai` client against the local chat server (answers, garbage, timeouts, the cache)."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from chat_server import ChatServer, answer, slow
from data_engine import core
from data_engine.prompts import DEFAULT_DIR
from layerjax.data import schema
from layerjax.data.schema import Layer
from layerjax.reward.judges import AgentJudge, GroundTruthJudge, JsonlCache, image_key
from layerjax.reward.relations import (Relation, Thresholds, agreement, choices, propose,
                                       question, read)

T = Thresholds()
BG, RED, GREEN = (0.2, 0.4, 0.6), (0.9, 0.1, 0.1), (0.1, 0.8, 0.1)
LABELS = {'object_1': 'the red mug', 'object_2': 'the green book'}


def _rgba(h, w, rgb, alpha) -> np.ndarray:
  return np.dstack([np.broadcast_to(np.float32(rgb), (h, w, 3)), alpha]).astype(np.float32)


def small(shadow: bool = True, ghost: bool = False) -> schema.LayeredSample:
  """8x8, back to front: background, the mug's shadow, the mug (object_1), the book
  (object_2), which hides the mug at (4, 2) and (4, 3):

      x  0 1 2 3 4 5 6 7
    y0   . . . . . . . .
    y1   . . . . B B B .
    y2   . . M M B B B .
    y3   . . M M B B B .
    y4   . . M M m . . .      m: mug alpha 0.4
    y5   . S M M M S . .      S: shadow 0.5; under the mug at x 2-4 too
    y6   . S S S S s . .      s: shadow 0.08
    y7   . . . . . . . .

  `ghost`: the background keeps the mug's colour under it; `shadow`: whether it casts one."""
  h = w = 8
  mug = np.zeros((h, w), np.float32)
  mug[2:6, 2:5] = 1
  mug[4, 4] = 0.4
  book = np.zeros((h, w), np.float32)
  book[1:4, 4:7] = 1
  shade = np.zeros((h, w), np.float32)
  shade[5:7, 1:6] = 0.5
  shade[6, 5] = 0.08
  background = _rgba(h, w, BG, np.ones((h, w)))
  if ghost:
    background[mug > 0, :3] = RED
  layers = [Layer('background', 'background', background)]
  if shadow:
    layers.append(Layer('shadow_1', 'shadow', _rgba(h, w, (0, 0, 0), shade), owner='object_1'))
  layers += [Layer('object_1', 'object', _rgba(h, w, RED, mug), label='mug'),
             Layer('object_2', 'object', _rgba(h, w, GREEN, book), label='book')]
  return schema.assemble('small', layers)


def rel(kind, x=None, y=None, objects=('object_1',)):
  return Relation(kind, tuple(objects), None if x is None else (x, y))


HAND = [  # (relation, the answer read from `small()`), each stated from the drawing above
    (rel('on_object', 2, 2), 'yes'), (rel('on_object', 4, 2), 'no'),  # hidden by the book
    (rel('on_object', 4, 4), 'no'),  # alpha 0.4
    (rel('on_object', 5, 5), 'no'), (rel('on_object', 0, 0), 'no'),
    (rel('on_object', 5, 2, ['object_2']), 'yes'),
    (rel('hidden_part', 4, 2), 'yes'), (rel('hidden_part', 4, 3), 'yes'),
    (rel('hidden_part', 3, 3), 'no'), (rel('hidden_part', 5, 2), 'no'),  # the book only
    (rel('in_shadow', 1, 5), 'yes'), (rel('in_shadow', 3, 6), 'yes'),
    (rel('in_shadow', 3, 5), 'no'),  # under the mug: the photo shows the mug
    (rel('in_shadow', 5, 6), 'no'), (rel('in_shadow', 6, 6), 'no'),
    (rel('in_shadow', 1, 5, ['object_2']), 'no'),  # the book casts none
    (rel('background_free', 2, 2), 'yes'), (rel('background_free', 0, 0), 'yes'),
    (rel('in_front', objects=('object_1', 'object_2')), 'object_2'),
    (rel('in_front', objects=('object_2', 'object_1')), 'object_2'),
]


def test_read_every_kind_by_hand():
  sample = small()
  assert [read(sample, r, T) for r, _ in HAND] == [a for _, a in HAND]
  ghost = small(ghost=True)  # the background still shows the mug where the mug is
  assert read(ghost, rel('background_free', 2, 2), T) == 'no'
  assert read(ghost, rel('background_free', 4, 4), T) == 'yes'  # alpha 0.4: not the mug's
  assert read(ghost, rel('background_free', 0, 0), T) == 'yes'
  # Thresholds move the answers where the layers are faint.
  assert read(sample, rel('on_object', 4, 4), Thresholds(alpha=0.3)) == 'yes'
  assert read(sample, rel('in_shadow', 5, 6), Thresholds(shadow=0.05)) == 'yes'
  # Background (0.2, 0.4, 0.6) vs red (0.9, 0.1, 0.1): mean difference 0.5.
  assert read(sample, rel('background_free', 2, 2), Thresholds(colour=0.49)) == 'yes'
  assert read(sample, rel('background_free', 2, 2), Thresholds(colour=0.51)) == 'no'


def test_bad_relations_and_thresholds():
  sample = small()
  with pytest.raises(ValueError, match='outside the 8x8 image'):
    read(sample, rel('on_object', 8, 0), T)
  with pytest.raises(KeyError, match="no object layer named 'shadow_1'"):
    read(sample, rel('on_object', 0, 0, ['shadow_1']), T)
  with pytest.raises(ValueError, match='not one of'):
    Relation('depth', ('object_1',), (0, 0))
  with pytest.raises(ValueError, match='two different objects'):
    Relation('in_front', ('object_1', 'object_1'))
  with pytest.raises(ValueError, match='no point'):
    Relation('in_front', ('object_1', 'object_2'), (1, 1))
  with pytest.raises(ValueError, match='pixel indices'):
    Relation('on_object', ('object_1',), (1.5, 2))
  with pytest.raises(ValueError, match='Thresholds.shadow'):
    Thresholds(shadow=0)
  with pytest.raises(ValueError, match="no label for object layer 'object_3'"):
    question(rel('on_object', 1, 1, ['object_3']), LABELS)


def test_questions_and_choices():
  assert question(rel('on_object', 2, 5), LABELS) == (
      'Is the point (2, 5) on the red mug, as the photo shows it (not on something in front '
      'of it)?')
  assert question(rel('in_shadow', 2, 5), LABELS, mark='3') == (
      'Is the point marked 3 at (2, 5) in the shadow that the red mug casts, as the photo '
      'shows it?')
  pair = rel('in_front', objects=('object_1', 'object_2'))
  assert question(pair, LABELS) == ('Which is in front, nearer the camera (covering the other '
                                    'where they overlap): the red mug or the green book?')
  assert choices(pair, LABELS) == ('the red mug', 'the green book')
  assert choices(rel('hidden_part', 0, 0), LABELS) == ('yes', 'no')


def scene() -> schema.LayeredSample:
  """24x24: the mug (rows 6-17, columns 6-15) casts a shadow (rows 16-21, columns 4-18) and
  is partly behind the book (rows 3-9, columns 13-20)."""
  h = w = 24
  mug, book, shade = (np.zeros((h, w), np.float32) for _ in range(3))
  mug[6:18, 6:16] = 1
  book[3:10, 13:21] = 1
  shade[16:22, 4:19] = 0.6
  return schema.assemble('scene', [
      Layer('background', 'background', _rgba(h, w, BG, np.ones((h, w)))),
      Layer('shadow_1', 'shadow', _rgba(h, w, (0, 0, 0), shade), owner='object_1'),
      Layer('object_1', 'object', _rgba(h, w, RED, mug)),
      Layer('object_2', 'object', _rgba(h, w, GREEN, book))])


def _near(sample, kind, name, flip_to, p, dist=2.0):
  """Brute force: a pixel within `dist` of p reads `flip_to` for (kind, name)."""
  h, w = sample.size
  x, y = p
  return any(read(sample, Relation(kind, (name,), (u, v)), T) == flip_to
             for v in range(h) for u in range(w) if (u - x) ** 2 + (v - y) ** 2 <= dist ** 2)


def test_propose_puts_points_where_answers_change():
  sample = scene()
  rels = propose(sample, np.random.default_rng(0), 10_000)
  assert len(rels) == len(set(rels))
  assert [r for r in rels if r.kind == 'in_front'] == [rel('in_front', objects=('object_1',
                                                                                'object_2'))]
  h, w = sample.size
  by = {}
  for r in rels:
    if r.point is not None:
      assert 0 <= r.point[0] < w and 0 <= r.point[1] < h
      by.setdefault((r.kind, r.objects[0]), set()).add(r.point)
  pixels = [(x, y) for y in range(h) for x in range(w)]
  ans = lambda kind, name, p: read(sample, Relation(kind, (name,), p), T)
  flip = {'yes': 'no', 'no': 'yes'}
  for name in ('object_1', 'object_2'):  # both sides of the boundary, within 2 px of it
    want = {p for p in pixels if _near(sample, 'on_object', name, flip[ans('on_object', name, p)],
                                       p)}
    assert by[('on_object', name)] == want
    assert {ans('on_object', name, p) for p in want} == {'yes', 'no'}
  assert by[('in_shadow', 'object_1')] == {  # in the seen shadow, and just outside it
      p for p in pixels if ans('in_shadow', 'object_1', p) == 'yes'
      or _near(sample, 'in_shadow', 'object_1', 'yes', p)}
  book = lambda p: ans('on_object', 'object_2', p) == 'yes'
  hidden = by[('hidden_part', 'object_1')]  # the hidden part, and the book just beside it
  assert {p for p in hidden if ans('hidden_part', 'object_1', p) == 'yes'} == {
      (x, y) for x in range(13, 16) for y in range(6, 10)}
  assert {p for p in hidden if ans('hidden_part', 'object_1', p) == 'no'} == {
      p for p in pixels if book(p) and ans('hidden_part', 'object_1', p) == 'no'
      and _near(sample, 'hidden_part', 'object_1', 'yes', p)}
  assert by[('background_free', 'object_1')] == {(x, y) for x in range(6, 16)
                                                 for y in range(6, 18)}
  assert by[('background_free', 'object_2')] == {(x, y) for x in range(13, 21)
                                                 for y in range(3, 10)}
  assert set(by) == {('on_object', 'object_1'), ('on_object', 'object_2'),
                     ('in_shadow', 'object_1'), ('hidden_part', 'object_1'),
                     ('background_free', 'object_1'), ('background_free', 'object_2')}


def test_propose_takes_turns_is_deterministic_and_bounded():
  sample = scene()
  few = propose(sample, np.random.default_rng(7), 5)
  # One from each group in turn: the mug's boundary inside, outside, its shadow inside,
  # outside, its hidden part.
  assert [(r.kind, read(sample, r, T)) for r in few] == [
      ('on_object', 'yes'), ('on_object', 'no'), ('in_shadow', 'yes'), ('in_shadow', 'no'),
      ('hidden_part', 'yes')]
  assert propose(sample, np.random.default_rng(7), 5) == few
  assert propose(sample, np.random.default_rng(8), 5) != few
  assert len(propose(sample, np.random.default_rng(0), 40)) == 40
  assert propose(sample, np.random.default_rng(0), 0) == []
  with pytest.raises(ValueError, match='n=-1'):
    propose(sample, np.random.default_rng(0), -1)


def test_agreement_closed_forms():
  assert agreement(['yes', 'no', 'yes', 'no'], ['yes', 'yes', 'yes', 'unknown']) == 2 / 3
  assert agreement(['object_2', 'no'], ['object_2', None]) == 1.0
  assert agreement(['yes', 'unknown'], ['no', 'yes']) == 0.0
  assert agreement(['yes'], ['unknown']) is None
  assert agreement([], []) is None
  with pytest.raises(ValueError, match='2 model answers for 1 judge answers'):
    agreement(['yes', 'no'], ['yes'])


def test_ground_truth_judge_agrees_with_truth_and_sees_known_errors():
  truth = small()
  judge = GroundTruthJudge([scene(), truth], T)
  relations = [r for r, _ in HAND]
  assert judge.answer(truth.image, relations, LABELS) == [a for _, a in HAND]
  proposed = propose(truth, np.random.default_rng(1), 100)
  truth_says = judge.answer(truth.image, proposed, LABELS)
  assert agreement([read(truth, r, T) for r in proposed], truth_says) == 1.0
  # A model whose background keeps the mug: wrong on background_free over the mug's pixels
  # (alpha >= 0.5); one without the shadow: wrong wherever the shadow is seen.
  ghost_wrong = [r.kind == 'background_free' and r.objects == ('object_1',)
                 and truth.layers[2].rgba[r.point[1], r.point[0], 3] >= 0.5 for r in proposed]
  shadow_wrong = [r.kind == 'in_shadow' and a == 'yes' for r, a in zip(proposed, truth_says)]
  assert sum(ghost_wrong) >= 3 and sum(shadow_wrong) >= 3
  for model, wrong in ((small(ghost=True), ghost_wrong), (small(shadow=False), shadow_wrong)):
    got = agreement([read(model, r, T) for r in proposed], truth_says)
    assert got == 1 - sum(wrong) / len(proposed)
  other = np.zeros((8, 8, 3), np.float32)
  assert judge.answer(other, relations[:3], LABELS) == ['unknown'] * 3
  assert judge.answer(truth.image, [rel('on_object', 1, 1, ['object_9'])], {}) == ['unknown']
  assert (judge.counts['no_ground_truth'], judge.counts['no_such_object']) == (3, 1)


# --- the agent judge ----------------------------------------------------------------------

KEY_ENV = 'TEST_REWARD_AGENT_KEY'
ASKED = [rel('on_object', 2, 2), rel('in_shadow', 1, 5), rel('hidden_part', 3, 3),
         rel('in_front', objects=('object_1', 'object_2'))]


@pytest.fixture
def server(monkeypatch):
  monkeypatch.setenv(KEY_ENV, 'k')
  with ChatServer() as s:
    yield s


def _judge(server, cache=None, **options) -> AgentJudge:
  spec = {'name': 'openai', 'base_url': server.url, 'model': 'test-vlm', 'api_key_env': KEY_ENV,
          'timeout': 2.0, 'max_retries': 0, 'backoff': 0.01, **options}
  return AgentJudge(core.create('agent', {'name': 'llm', 'backend': spec}), cache)


def _sent(request) -> tuple[np.ndarray, str]:
  system, user = request.body['messages']
  assert system['content'] == (DEFAULT_DIR / 'relate' / 'v1.txt').read_text().strip()
  image, text = user['content'][0], user['content'][1]['text']
  url = image['image_url']['url'].split(',', 1)[1]
  with Image.open(io.BytesIO(base64.b64decode(url))) as im:
    return np.asarray(im, np.float32) / 255, text


def test_agent_judge_answers_marks_and_caches(server, tmp_path):
  photo = small().image
  cache = JsonlCache(tmp_path / 'judge.jsonl')
  judge = _judge(server, cache)
  server.push(answer({'reason': 'mug, shadow, mug, book on top',
                      'answers': ['yes', ' Yes.', 'NO', 'the green book']}))
  assert judge.answer(photo, ASKED, LABELS) == ['yes', 'yes', 'no', 'object_2']
  (request,) = server.requests
  assert request.body['response_format']['json_schema']['schema']['properties']['answers'] == {
      'type': 'array', 'items': {'type': 'string', 'minLength': 1}, 'minItems': 4,
      'maxItems': 4}
  image, text = _sent(request)
  assert text == (
      'Photo size: 8x8 pixels.\nQuestions:\n'
      '1. Is the point marked 1 at (2, 2) on the red mug, as the photo shows it (not on '
      'something in front of it)? Choices: yes | no\n'
      '2. Is the point marked 2 at (1, 5) in the shadow that the red mug casts, as the photo '
      'shows it? Choices: yes | no\n'
      '3. Is the point marked 3 at (3, 3) on a part of the red mug that is hidden behind '
      'something in front of it? Choices: yes | no\n'
      '4. Which is in front, nearer the camera (covering the other where they overlap): the '
      'red mug or the green book? Choices: the red mug | the green book')
  assert np.abs(image - photo).max() > 0.5  # the marks are drawn
  assert dict(judge.counts) == {'requests': 1, 'questions': 4, 'answered': 4}
  # Asked again, by this judge or by a new one reading the cache file: no request.
  assert judge.answer(photo, ASKED, LABELS) == ['yes', 'yes', 'no', 'object_2']
  again = _judge(server, JsonlCache(tmp_path / 'judge.jsonl'))
  assert again.answer(photo, ASKED[::-1], LABELS) == ['object_2', 'no', 'yes', 'yes']
  assert len(server.requests) == 1 and again.counts['cached'] == 4
  lines = [json.loads(x) for x in (tmp_path / 'judge.jsonl').read_text().splitlines()]
  assert lines[3] == {'image': image_key(photo), 'question': question(ASKED[3], LABELS),
                      'answer': 'the green book'}


def test_agent_judge_point_is_left_unpainted(server):
  photo = scene().image
  server.push(answer({'reason': 'on it', 'answers': ['yes']}))
  assert _judge(server).answer(photo, [rel('on_object', 10, 12)], LABELS) == ['yes']
  image, _ = _sent(server.requests[0])
  np.testing.assert_allclose(image[12, 10], photo[12, 10], atol=0.5 / 255 + 1e-6)
  assert np.abs(image - photo).max() > 0.5


def test_agent_judge_garbage_timeouts_and_same_labels(server):
  photo = small().image
  judge = _judge(server)
  server.push(answer({'reason': 'unsure', 'answers': ['yes', 'perhaps', 'no', 'a chair']}))
  assert judge.answer(photo, ASKED, LABELS) == ['yes', 'unknown', 'no', 'unknown']
  assert judge.counts['invalid_answer'] == 2
  # Only the two left unanswered are asked again; three answers to two questions is garbage.
  server.push(answer({'reason': 'x', 'answers': ['yes', 'no', 'yes']}))
  assert judge.answer(photo, ASKED, LABELS) == ['yes', 'unknown', 'no', 'unknown']
  assert judge.counts['agent_garbage'] == 2 and judge.counts['cached'] == 2
  assert '2. ' in _sent(server.requests[1])[1] and '3. ' not in _sent(server.requests[1])[1]
  server.push(answer('no JSON here'))
  assert judge.answer(photo, ASKED, LABELS) == ['yes', 'unknown', 'no', 'unknown']
  assert judge.counts['agent_garbage'] == 4
  slow_judge = _judge(server, timeout=1.0)
  server.push(slow(3.0, {'reason': 'late', 'answers': ['yes'] * 4}))
  assert slow_judge.answer(photo, ASKED, LABELS) == ['unknown'] * 4
  assert slow_judge.counts['agent_timeout'] == 4
  twins = {'object_1': 'a cup', 'object_2': 'A cup'}
  assert judge.answer(photo, ASKED[3:], twins) == ['unknown']
  assert judge.counts['same_label'] == 1 and len(server.requests) == 4
  judge.cache[(image_key(photo), question(ASKED[1], LABELS))] = 'maybe'  # not a choice: asked
  server.push(answer({'reason': 'x', 'answers': ['yes', 'the red mug']}))
  assert judge.answer(photo, ASKED, LABELS) == ['yes', 'yes', 'no', 'object_1']
  with pytest.raises(ValueError, match='has no relate method'):
    AgentJudge(core.create('agent', {'name': 'rule_based'}))


def test_llm_relate_arguments(server):
  agent = _judge(server).agent
  assert agent.relate(small().image, [], []) == [] and not server.requests
  with pytest.raises(ValueError, match='relate got 1 questions and 0 lists of choices'):
    agent.relate(small().image, ['Is it?'], [])


def test_jsonl_cache_file_errors(tmp_path):
  path = tmp_path / 'c.jsonl'
  path.write_text('{"image": "a", "question": "q", "answer": "yes"}\n{"image": "b", "quest')
  assert dict(JsonlCache(path)) == {('a', 'q'): 'yes'}  # the cut-short last line is skipped
  path.write_text('{"image": "a"}\n{"image": "a", "question": "q", "answer": "yes"}\n')
  with pytest.raises(ValueError, match=r'c.jsonl: line 1 is not a cache entry'):
    JsonlCache(path)
