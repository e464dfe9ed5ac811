"""A scripted MLLM judge for reward finetuning: answers the llm agent's `relate` requests from
the ground truth of synthetic scenes, over real HTTP (`chat_server.ChatServer`).

It sees what a real judge would: the marked photo (a PNG in the request) and the questions'
text. It finds the scene by the photo (among the scenes with the objects the questions name,
the nearest ground-truth image by the median pixel difference, the rings aside),
the object by its label, each point by the coordinates the question gives, and answers with
`relations.read`. So the endpoint path of `layerjax.train.reasonx` (agent, prompt, JSON schema,
parsing, cache) runs end to end and its rewards can be compared with the offline judge's.

    python tests/oracle_judge.py DATA_DIR SPLIT[,SPLIT...] [--port 8765] [--garbage 0.1]

serves until interrupted, printing its URL (base_url for `configs/reasonx.py`'s judge=URL);
`--garbage` answers that share of requests with a reply that is not JSON (counted by the
trainer as dropped).
"""

from __future__ import annotations

import argparse
import base64
import io
import re
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat_server import ChatServer, Reply, answer  # noqa: E402
from layerjax.reward.photos import label_of  # noqa: E402
from layerjax.reward.relations import Relation, Thresholds, read  # noqa: E402

_POINT = r'the point marked \d+ at \((\d+), (\d+)\)'
_KINDS = (('on_object', re.compile(rf'Is {_POINT} on (.+), as the photo shows it \(not')),
          ('in_shadow', re.compile(rf'Is {_POINT} in the shadow that (.+) casts')),
          ('hidden_part', re.compile(rf'Is {_POINT} on a part of (.+) that is hidden')),
          ('background_free', re.compile(rf'If (.+) were taken out of the scene, would '
                                         rf'{_POINT} show')))
_FRONT = re.compile(r'Which is in front.*\): (.+) or (.+)\? Choices')


def relate_oracle(samples, thresholds: Thresholds = Thresholds(), garbage: float = 0.0,
                  seed: int = 0):
  """`ChatServer`'s `respond` for relate requests about `samples` (LayeredSamples)."""
  scenes = list(samples)
  rng = np.random.default_rng(seed)

  def respond(body: dict) -> Reply:
    if garbage and rng.uniform() < garbage:
      return answer('this is not JSON')
    user = body['messages'][1]['content']
    url = user[0]['image_url']['url'].split(',', 1)[1]
    with Image.open(io.BytesIO(base64.b64decode(url))) as im:
      photo = np.asarray(im.convert('RGB'), np.float32) / 255
    lines = [line for line in user[1]['text'].split('\n') if re.match(r'\d+\. ', line)]
    # The scene: one whose objects carry every label asked about, the nearest by the median
    # pixel difference (the rings cover much of a small photo, never most of its pixels).
    asked = {m.group(1 if kind == 'background_free' else 3) for line in lines
             for kind, pattern in _KINDS for m in [pattern.search(line)] if m}
    same = [s for s in scenes if s.image.shape == photo.shape
            and asked <= {label_of(l) for l in s.layers if l.kind == 'object'}] or [
                s for s in scenes if s.image.shape == photo.shape]
    truth = min(same, key=lambda s: np.median(np.abs(s.image - photo).mean(-1)))
    names = {label_of(l): l.name for l in truth.layers if l.kind == 'object'}
    answers = []
    for line in lines:
      front = _FRONT.search(line)
      if front:
        a, b = (names.get(t) for t in front.groups())
        rel = Relation('in_front', (a, b))
        answers.append(front.group(1) if read(truth, rel, thresholds) == a else front.group(2))
        continue
      for kind, pattern in _KINDS:
        m = pattern.search(line)
        if m:
          groups = m.groups()
          x, y, label = ((groups[1], groups[2], groups[0]) if kind == 'background_free'
                         else groups)
          name = names.get(label)
          answers.append('unknown' if name is None else
                         read(truth, Relation(kind, (name,), (int(x), int(y))), thresholds))
          break
      else:
        answers.append('unknown')
    return answer({'reason': 'read from the ground truth', 'answers': answers})

  return respond


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('data_dir')
  parser.add_argument('splits')
  parser.add_argument('--port', type=int, default=0)
  parser.add_argument('--garbage', type=float, default=0.0)
  a = parser.parse_args()
  from layerjax.data.pipeline import tfds_split
  from layerjax.data.tfds_builder import from_example
  samples = []
  for split in a.splits.split(','):
    records = tfds_split('layered', a.data_dir, split)
    samples += [from_example(records[i]) for i in range(len(records))]
  with ChatServer(respond=relate_oracle(samples, garbage=a.garbage), port=a.port) as server:
    print(server.url, flush=True)
    while True:
      time.sleep(3600)


if __name__ == '__main__':
  main()
