"""The decomposition job with an LLM agent behind a local chat-completions server: the agent
plans, captions, judges and checks texts; every decision and the prompt versions it answered
under are in the sample's provenance; an endpoint that goes down drops photos with the
reason, and a re-run completes them."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chat_server import ChatServer, answer, error
from data_engine import runners
from data_engine.__main__ import main
from layerjax.data import schema
from test_engine import disc_photo

KEY_ENV = 'LAYERJAX_TEST_KEY'
PLAN = {'labels': ['ball'], 'reason': 'ground visible below the ball', 'shadows': False}
CAPTION = {'label': 'ball', 'caption': 'a ball', 'referring': ['the ball in the middle']}
JUDGE = {'reason': 'clean background, intact ball', 'background': 5, 'objects': 5, 'alpha': 4}
CHECK = {'reason': 'the caption names what is shown', 'agrees': True}


@pytest.fixture
def server(monkeypatch):
  monkeypatch.setenv(KEY_ENV, 'k')
  with ChatServer() as s:
    yield s


def _args(tmp_path, server) -> list[str]:
  agent = {'name': 'llm', 'backend': {'name': 'openai', 'base_url': server.url, 'model': 'm',
                                      'api_key_env': KEY_ENV, 'timeout': 5.0,
                                      'max_retries': 1, 'backoff': 0.01}}
  return ['decompose', '--input', str(tmp_path / 'photos'), '--output', str(tmp_path / 'out'),
          '--quiet', '--set', f'agent={agent!r}', '--set', "tools.captioner={'name': 'agent'}",
          '--set', 'decompose.min_side=64']


def _photo(tmp_path, name: str, seed: int) -> None:
  (tmp_path / 'photos').mkdir(exist_ok=True)
  Image.fromarray(np.round(disc_photo(170, seed) * 255).astype(np.uint8)).save(
      tmp_path / 'photos' / f'{name}.png')


def _one_photo_script(server) -> None:
  server.push(answer(PLAN), answer(CAPTION), answer(JUDGE), answer(CHECK))


def test_agent_decisions_and_prompt_versions_travel_with_the_sample(tmp_path, server):
  _photo(tmp_path, 'p0', 4)
  _one_photo_script(server)
  assert main(_args(tmp_path, server)) == 0
  tasks = [r.body['response_format']['json_schema']['name'] for r in server.requests]
  assert tasks == ['plan', 'caption', 'judge', 'check_text']
  (folder,) = (tmp_path / 'out' / 'samples').iterdir()
  sample = schema.read_folder(folder)
  obj = sample.layer('object_1')
  assert (obj.label, obj.caption, obj.referring) == ('ball', 'a ball', ('the ball in the middle',))
  engine = sample.provenance['engine']
  assert engine['prompt_versions']['judge'] == 'v1' and engine['fallbacks'] == []
  decisions = {d['stage']: d for d in engine['decisions']}
  assert decisions['understand']['details']['plan']['reason'] == PLAN['reason']
  assert decisions['understand']['details']['plan']['prompt_version'] == 'plan/v1'
  assert decisions['shadows']['details']['skipped'] == 'disabled by config or plan'
  post = decisions['postfilter']['details']
  assert post['judge_score'] == 0.75 and 'judge/v1' in post['judge_reason']
  assert 'check_text/v1' in post['text_checks']['object_1']


def test_an_endpoint_that_goes_down_drops_photos_and_a_rerun_completes_them(tmp_path, server):
  _photo(tmp_path, 'p0', 4)
  _photo(tmp_path, 'p1', 4)
  # p0 is answered; for p1 the endpoint fails (503 twice: the try and the one retry).
  _one_photo_script(server)
  server.push(error(503), error(503))
  assert main(_args(tmp_path, server)) == 0
  outcome = {Path(k).stem: e['dropped'] for k, e in runners.finished(tmp_path / 'out').items()}
  assert outcome == {'p0': None, 'p1': 'understand: agent_unavailable'}
  summary = json.loads((tmp_path / 'out' / runners.SUMMARY).read_text())
  assert summary['retry_on_rerun'] == 1
  served = len(server.requests)
  _one_photo_script(server)
  assert main(_args(tmp_path, server)) == 0
  assert len(server.requests) == served + 4  # only p1 was redone
  outcome = {Path(k).stem: e['dropped'] for k, e in runners.finished(tmp_path / 'out').items()}
  assert outcome == {'p0': None, 'p1': None}
  summary = json.loads((tmp_path / 'out' / runners.SUMMARY).read_text())
  assert summary['samples'] == 2 and summary['retry_on_rerun'] == 0
