"""Shared test helpers: random diffusers models saved as real folders, layout helpers,
parity against a float64 reference."""

import os

# Eight fake CPU devices for the sharding tests; must be set before JAX initialises. LLVM at
# -O0: the tests' programs are compiled once and run a few steps, and compiling is most of
# their time (the tiny model's train step: 22 s at -O3, 14 s at -O0; test_train and
# test_mmdit: 209 -> 165 s). Without fast-math the level does not change what is computed.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                      '--xla_backend_optimization_level=0')
# gcsfs (2026) reads this at import: otherwise it asks a gRPC control plane, which no local
# GCS server serves, about every bucket (a minute's timeout each). See tests/test_gcs.py.
os.environ['GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT'] = 'false'

import atexit
import shutil
import tempfile

# Libraries leave empty folders in the system's temporary folder: gradio_client one per file
# it downloads, Beam's job server and TFDS one per run (~150 a `make test`, which CI's box
# kept). Theirs go to a folder of this process (and its subprocesses, through TMPDIR), removed
# at exit; pytest's own tmp_path folders stay where they were.
os.environ.setdefault('PYTEST_DEBUG_TEMPROOT', tempfile.gettempdir())
tempfile.tempdir = os.environ['TMPDIR'] = tempfile.mkdtemp(prefix='layerjax-tests-')
atexit.register(shutil.rmtree, tempfile.tempdir, True)

import numpy as np
import pytest


def randomize_(module, seed: int, std: float = 0.2):
  """Fills every parameter and buffer of a torch module with N(0, std) (norm scales ~1)."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
      noise = torch.randn(t.shape, generator=g, dtype=torch.float32) * std
      is_norm_scale = name.endswith('.weight') and 'norm' in name.split('.')[-2]
      base = 1.0 if is_norm_scale else 0.0
      t.copy_((noise + base).to(t.dtype))
  return module


def nchw_to_nhwc(x):
  return np.transpose(np.asarray(x), (0, 2, 3, 1))


def nhwc_to_nchw(x):
  return np.transpose(np.asarray(x), (0, 3, 1, 2))


# Machine epsilon of each precision a parity test runs in.
EPS = {'float32': float(np.finfo(np.float32).eps), 'bfloat16': 2.0 ** -7}


def assert_parity(ours, torch_low, ref64, precision: str = 'float32', c: float = 8.0):
  """Our output is as close to the float64 reference as PyTorch's own in the same precision:

    max |ours - ref64| <= 2 * max |torch_low - ref64| + c * eps * max |ref64|

  `torch_low` is the PyTorch reference run in `precision` (machine epsilon `eps`), `ref64`
  the same reference in float64 on the same weights and inputs (`torch_reference`). The
  bound follows the arithmetic (how much rounding the function amplifies), not one machine's
  rounding; the floor covers outputs that PyTorch happens to round almost exactly. The
  numbers are printed (`pytest -rP` shows them for passing tests too).
  """
  ours, low, ref = (np.asarray(a, np.float64) for a in (ours, torch_low, ref64))
  assert ours.shape == low.shape == ref.shape, (ours.shape, low.shape, ref.shape)
  scale = np.abs(ref).max()
  err_ours, err_torch = np.abs(ours - ref).max(), np.abs(low - ref).max()
  floor = c * EPS[precision] * scale
  bound = 2 * err_torch + floor
  report = (f'{precision}: err_ours {err_ours:.3g} vs bound {bound:.3g} = 2 * err_torch '
            f'{err_torch:.3g} + floor {floor:.3g} (= {c:g} * eps * scale {scale:.3g})')
  print('parity', report)
  assert err_ours <= bound, report


def torch_reference(model, precision: str):
  """`model` (an fp32 torch module or diffusers pipeline) as PyTorch computes it in
  `precision`: 'float32' is the model itself, 'bfloat16' and 'float64' are copies.

  The float64 copy is float64 throughout where diffusers would not be: its `Timesteps`
  computes the sinusoid in fp32 whatever the model's dtype. The arguments reach 1000 rad,
  where fp32 rounding, or an ulp's difference between two libraries' exp, moves them by up
  to 6e-5. A plain `.double()` copy shares PyTorch fp32's rounding there exactly: PyTorch
  looked exact and layerjax, whose frequencies are correctly rounded, 10x worse (SD3,
  t = 999: 8.9e-5 vs 9.0e-6 at output scale 8.2; 1.4e-4 vs 1.7e-4 against this reference).
  Those modules get the same formula in float64. Norms that take a mean square in fp32
  (diffusers' RMSNorm, T5's LayerNorm) are left: that one rounding is within the floor of
  `assert_parity`.
  """
  import copy
  import math

  import torch
  from diffusers.models.embeddings import Timesteps

  class Float64Timesteps(torch.nn.Module):
    def __init__(self, fp32: Timesteps):
      super().__init__()
      self.fp32 = fp32

    def forward(self, t):
      p, half = self.fp32, self.fp32.num_channels // 2
      i = torch.arange(half, dtype=torch.float64)
      args = p.scale * t.double()[:, None] * torch.exp(
          -math.log(10000) * i / (half - p.downscale_freq_shift))
      sin, cos = torch.sin(args), torch.cos(args)
      return torch.cat([cos, sin] if p.flip_sin_to_cos else [sin, cos], -1)

  if precision == 'float32':
    return model
  ref = copy.deepcopy(model).to(getattr(torch, precision))
  if precision == 'float64':
    parts = [ref] if isinstance(ref, torch.nn.Module) else ref.components.values()
    for part in [p for p in parts if isinstance(p, torch.nn.Module)]:
      for name, child in list(part.named_modules()):
        if isinstance(child, Timesteps):
          parent, _, attr = name.rpartition('.')
          setattr(part.get_submodule(parent), attr, Float64Timesteps(child))
  return ref


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: long tests, run with -m slow')



def _shared(tmp_path_factory, name: str):
  """A folder every xdist worker of this run sees (the workers' base folders' parent), and a
  lock on it: what one worker builds there the others take instead of building it again."""
  from filelock import FileLock
  base = tmp_path_factory.getbasetemp()
  root = (base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base) / name
  return root, FileLock(f'{root}.lock')


@pytest.fixture(scope='session')
def trained_workdirs(tmp_path_factory):
  """kind ('pixels' or 'vae', `train_utils.tiny`) -> (config, its workdir after 2 training
  steps), each trained once per run (by whichever worker asks first), when first asked for:
  what the inference tests load, pack and decompose with, never write to. Every prompt kind
  is trained."""
  from train_utils import make_dataset, one_device, tiny, write_embeddings
  from layerjax.train import trainer
  root, lock = _shared(tmp_path_factory, 'trained')
  with lock:
    if not (root / 'made').exists():
      make_dataset(root / 'data')
      write_embeddings(root / 'emb.safetensors', 6, 16, 16)
      (root / 'made').touch()
  data, emb = root / 'data' / 'tfds', root / 'emb.safetensors'

  def get(kind):
    c = tiny(data, kind, embeddings=emb, total_steps=2, checkpoint_every=2)
    c.data.prompt_probs = {'box': 0.4, 'point+text': 0.3, 'mask': 0.3}
    with lock:
      if not (root / f'{kind}.made').exists():
        trainer.train(c, root / kind, mesh=one_device(c))  # 53 -> 34 s on one device
        (root / f'{kind}.made').touch()
    return c, root / kind
  get.embeddings = emb
  return get


@pytest.fixture(scope='session')
def packed(trained_workdirs, tmp_path_factory):
  """The 'pixels' tiny model of `trained_workdirs`, packed for inference (once per run)."""
  from layerjax.infer import model as infer_model
  root, lock = _shared(tmp_path_factory, 'packed')
  workdir = trained_workdirs('pixels')[1]
  with lock:
    if not (root / 'model').exists():
      infer_model.pack(workdir, root / 'model')
  return root / 'model'


# A local vision-language model for the agents that take one (the engine, ReasonX's judge).
VLM_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope='session')
def tiny_vlm(tmp_path_factory):
  """A random LLaVA (tiny CLIP vision tower + tiny Llama) with a byte-level BPE tokenizer
  trained here, saved with save_pretrained."""
  import torch
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                            LlavaForConditionalGeneration, LlavaProcessor,
                            PreTrainedTokenizerFast)
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(['{"reason": "ok", "agrees": true} the layer shows a red box'],
                          trainers.BpeTrainer(vocab_size=300, special_tokens=[
                              '<s>', '</s>', '<pad>', '<image>'],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token='<s>', eos_token='</s>',
                                      pad_token='<pad>',
                                      extra_special_tokens={'image_token': '<image>'})
  processor = LlavaProcessor(
      image_processor=CLIPImageProcessor(size={'shortest_edge': 16},
                                         crop_size={'height': 16, 'width': 16}),
      tokenizer=tokenizer, patch_size=4, vision_feature_select_strategy='full',
      num_additional_image_tokens=1, chat_template=VLM_CHAT_TEMPLATE)
  config = LlavaConfig(
      vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=16, patch_size=4),
      text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                              max_position_embeddings=1024, bos_token_id=0, eos_token_id=1,
                              pad_token_id=2),
      image_token_id=tokenizer.convert_tokens_to_ids('<image>'),
      vision_feature_select_strategy='full', vision_feature_layer=-1)
  torch.manual_seed(0)
  path = tmp_path_factory.mktemp('tiny_llava')
  LlavaForConditionalGeneration(config).save_pretrained(path)
  processor.save_pretrained(path)
  return path
