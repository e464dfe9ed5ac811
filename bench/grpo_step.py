"""Reward finetuning's step (`layerjax.train.reasonx`): seconds per GRPO step split into
sampling, judging and the update, and judge calls per second, with the offline ground-truth
judge and with the llm agent over HTTP (the test suite's chat server answering from the
ground truth, `tests/oracle_judge.py`), in one run.

    python bench/grpo_step.py [--start out/demo/model] [--steps 5] [--photos 8 --group 4]

What each figure is (one step, after a warm-up step that compiles):
  sampling        from the step's start until the last sampling call's layers are on the
                  host: the stochastic sampler's calls (dispatched together) and their
                  decoding; judging of the first calls already runs meanwhile
  judging wait    from then until every photo's rewards are in: the judging not hidden
                  behind the sampling
  update          the GRPO update (minibatches x timesteps forward and backward passes of
                  the model and one of the reference), to its result on the host
  requests/s      relate requests (one per photo) per second of the whole step: what the
                  loop drew from the judge; the oracle answers at once, so this is the
                  client's side (image encoding, JSON schema, parsing), not an MLLM's
No peer runs beside it: there is no reference GRPO for this decomposer to run in the same
process; Flow-GRPO's own figures are for SD3.5 at 512 px on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests'))


def run(args, judge_kind: str, url: str | None) -> dict:
  import jax
  from train_utils import load_config_file

  from layerjax.train import reasonx, trainer
  c = load_config_file('reasonx', f'demo,start={args.start}')
  r = c.reasonx
  r.photos_per_step, r.group_size, r.sample_photos = args.photos, args.group, args.sample_photos
  r.held_out = ''
  if judge_kind == 'agent':
    r.judge.kind = 'agent'
    r.judge.agent = {'name': 'llm', 'backend': {'name': 'openai', 'base_url': url,
                                                'model': 'oracle', 'api_key_env': 'BENCH_KEY'}}
  config = reasonx.full_config(c)
  reasonx.check(config)
  mesh = trainer.check_config(config)
  workdir = Path(args.workdir) / judge_kind
  judge = reasonx.make_judge(config, workdir)
  if judge_kind == 'agent':
    judge.cache = {}  # every question asked: the requests are what is measured
  program = reasonx.GRPO(config, mesh, workdir, judge, None)  # as `trainer.run` makes it
  state = program.setup.state
  with jax.set_mesh(mesh):
    t = time.perf_counter()
    state, _ = program.step(state, 0)
    first = time.perf_counter() - t
    rows = []
    for i in range(1, args.steps + 1):
      requests = judge.counts.get('requests', 0)
      t = time.perf_counter()
      state, m = program.step(state, i)
      rows.append({'step_s': time.perf_counter() - t, 'sampling_s': m['time/sampling_s'],
                   'judging_wait_s': m['time/judging_wait_s'], 'update_s': m['time/update_s'],
                   'requests': judge.counts.get('requests', 0) - requests})
  out = {k: float(np.median([row[k] for row in rows])) for k in rows[0]}
  out['first_step_s'] = first
  out['photos'], out['decompositions'] = args.photos, args.photos * args.group
  if judge_kind == 'agent':
    out['requests_per_s'] = out['requests'] / out['step_s']
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--start', default='out/demo/model')
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--photos', type=int, default=8)
  p.add_argument('--group', type=int, default=4)
  p.add_argument('--sample-photos', type=int, default=4)
  p.add_argument('--workdir', default='/tmp/bench_grpo')
  args = p.parse_args()
  from chat_server import ChatServer
  from oracle_judge import relate_oracle

  from layerjax.data.pipeline import tfds_split
  from layerjax.data.tfds_builder import from_example
  from layerjax.infer.model import experiment_config
  data = experiment_config(args.start).data
  records = tfds_split(data.name, data.data_dir, 'validation')
  scenes = [from_example(records[i]) for i in range(len(records))]
  results = {'ground_truth': run(args, 'ground_truth', None)}
  os.environ.setdefault('BENCH_KEY', 'k')
  with ChatServer(respond=relate_oracle(scenes)) as server:
    results['agent'] = run(args, 'agent', server.url)
  print(f'{"judge":<14}{"step s":>8}{"sampling":>10}{"judging wait":>14}{"update":>8}'
        f'{"requests/s":>12}')
  for name, r in results.items():
    print(f'{name:<14}{r["step_s"]:>8.2f}{r["sampling_s"]:>10.2f}{r["judging_wait_s"]:>14.2f}'
          f'{r["update_s"]:>8.2f}{r.get("requests_per_s", float("nan")):>12.2f}')
  print(json.dumps(results, indent=2))


if __name__ == '__main__':
  main()
