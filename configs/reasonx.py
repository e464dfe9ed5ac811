"""ReasonX: finetune a trained decomposer on unlabelled photos with judge rewards (GRPO).

    python -m layerjax.main --config=configs/reasonx.py:VARIANT[,key=value] --workdir=DIR

The model, its data settings, loss schedule and evaluation come from the trained model it
starts from (`reasonx.start`, a packed model folder or a training workdir: its recorded
experiment config); this file's keys replace theirs (`layerjax.train.reasonx.full_config`).
Each step decomposes `photos_per_step` photos `group_size` times with Flow-GRPO's stochastic
sampler, has a judge answer relations about each photo (is this point on the object, in its
shadow, on a hidden part of it, ...), rewards each decomposition with its agreement, and takes
a clipped policy-gradient step with a KL term to the starting model. Judge answers, rewards
and advantages are written as JSON lines under `audit/` beside the checkpoints.

Variants:
  demo      the demo model (`make demo`'s out/demo/model), finetuned on the demo data's
            validation scenes with the offline judge that reads their ground truth; the
            reward measured on held-out test scenes, and the test split's layer metrics,
            before and during finetuning. Minutes on a CPU.
Keys: start, data_dir (where the start's dataset is, if not where it was trained), photos
  (a folder, or tfds:SPLIT of the start's dataset), held_out, steps,
  judge=URL or FOLDER (the llm agent answers instead of the ground truth: through an
  OpenAI-compatible endpoint at URL, or a local vision-language model folder run by
  transformers), judge_model (the model name the endpoint serves), judge_key_env (the
  environment variable holding its API key), preference (the weight of the
  pairwise-preference reward).
"""

import ml_collections

from layerjax.config_spec import parse_arg


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 100
  c.log_every = 5
  c.eval_every = 50  # the held-out reward and the layer metrics, also before the first step
  c.checkpoint_every = 25
  c.keep_checkpoints = 2
  # The finetuned weights themselves: a short run of small steps needs no average, and the
  # reference the KL term holds them to is the start's EMA (what `reasonx.start` loads).
  c.ema_decay = 0.0
  # The layer metrics on scenes finetuning never sees; unset: the start's (named, so that a
  # flag such as --config.eval.seed=1 may set it).
  unset = ml_collections.config_dict.placeholder
  c.eval = dict(split='test', seed=unset(int), num_batches=unset(int),
                batch_per_device=unset(int), sample_steps=unset(int), use_ema=unset(bool))
  # A constant learning rate (final_lr_fraction 1: the cosine's end is its start).
  c.optimizer = dict(lr=1e-4, warmup_steps=0, decay_steps=c.total_steps, final_lr_fraction=1.0,
                     clip_norm=1.0, weight_decay=0.0)
  c.reasonx = dict(
      start='out/demo/model',
      photos='tfds:validation',  # a folder of photos, or tfds:SPLIT of the start's dataset
      held_out='tfds:test',      # where the held-out reward is measured ('' for none)
      held_out_photos=64,
      eval_layers=True,          # the layer metrics on eval.split at each evaluation
      photos_per_step=8,
      group_size=4,              # decompositions per photo (GRPO's group)
      sample_photos=4,           # photos per sampling call: judging overlaps the next call
      sample_steps=10,           # stochastic sampler steps
      noise_level=0.7,           # Flow-GRPO's a: the SDE's noise, g = a sqrt(s / (1 - s))
      guidance=1.0,
      timesteps=5,               # of the sampler's steps, how many each update trains on
      minibatches=2,             # optimizer steps per batch of samples (the later off-policy)
      clip=1e-4,                 # PPO's ratio clip; the ratio is per latent value (Flow-GRPO's)
      # Weight of the KL to the starting model. Flow-GRPO's 0.04 let the demo's background
      # drift (test RGB L1 +0.0028 in 60 steps, 4x its spread over sampler seeds, which the
      # relations do not reward); 0.4: +0.0005, with most of the reward's rise.
      kl=0.4,
      relations=8,               # relations proposed per decomposition (union per photo)
      band=2.0,                  # px from a predicted boundary where on_object points are drawn
      thresholds=dict(alpha=0.5, shadow=0.1, colour=0.05, front=0.15),
      prompts='detector',        # or 'dataset': a TFDS source's own prompt boxes
      detector='saliency_boxes',  # engine detector proposing the prompts
      relation_weight=1.0,
      judge=dict(kind='ground_truth', agent={}, workers=4, cache=''),
      preference=dict(weight=0.0, agent='rule_based', pairs=0),
  )
  return c


def get_config(arg=None):
  a = parse_arg(arg, variant='demo', start='', data_dir='', photos='', held_out='', steps=0,
                judge='',
                judge_model='default', judge_key_env='OPENAI_API_KEY', preference=-1.0)
  if a.variant != 'demo':
    raise ValueError(f'configs/reasonx.py: unknown variant {a.variant!r} (demo)')
  c = base()  # the demo: the demo model, its data, the offline judge
  r = c.reasonx
  for key in ('start', 'photos', 'held_out'):
    if a[key]:
      r[key] = a[key]
  if a.data_dir:  # where the start's dataset is now
    c.data = {'data_dir': a.data_dir}
  if a.steps:
    c.total_steps = a.steps
  if a.judge:
    r.judge.kind = 'agent'
    endpoint = a.judge.startswith(('http://', 'https://'))
    backend = ({'name': 'openai', 'base_url': a.judge, 'model': a.judge_model,
                'api_key_env': a.judge_key_env} if endpoint else
               {'name': 'transformers', 'path': a.judge})
    r.judge.agent = {'name': 'llm', 'backend': backend}
  if a.preference >= 0:
    r.preference.weight = a.preference
  return c
