"""SD3 text conditioning precomputed by the engine, so that training on TPUs needs no PyTorch.

SD3 conditions on three text encoders, read from a local diffusers folder laid out as
stabilityai/stable-diffusion-3-medium-diffusers:
  text_encoder, tokenizer       CLIP-L  (CLIPTextModelWithProjection)
  text_encoder_2, tokenizer_2   CLIP-G  (CLIPTextModelWithProjection)
  text_encoder_3, tokenizer_3   T5 encoder (T5EncoderModel); optional, zeros without it
Per text: states [77 + L, W] = CLIP-L ‖ CLIP-G penultimate hidden states, zero-padded on the
feature axis to T5's width W (4096), followed along the sequence by T5's L tokens; pooled
[2048] = CLIP-L ‖ CLIP-G projected pooled outputs. This is what diffusers'
`StableDiffusion3Pipeline.encode_prompt` gives (clip_skip None, one prompt per text, no
guidance), written with transformers alone; the tests compare the two.

`write_table` stores them in the safetensors table `layerjax.models.shared.TextEmbeddings`
reads (`<sha256(text)>.states`, `<sha256(text)>.pooled`) for every text `collect_texts`
finds that training can draw from the samples, the empty text included. Re-runs encode only
texts the table lacks. CLI: `python -m data_engine embed-texts` (`add_subcommand`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from data_engine.tools import hf
from layerjax import cli
from layerjax.data import schema
from layerjax.fileio import atomic_file, read_json

FORMAT = 'layerjax.sd3_text_embeddings/1'
COMPOSITION = ('states: CLIP-L || CLIP-G penultimate hidden states zero-padded to the T5 '
               'width, then T5 last hidden states (zeros without T5) along the sequence; '
               'pooled: CLIP-L || CLIP-G text_embeds')
# The states' width without T5 when the folder has no transformer/config.json to say it.
SD3_JOINT_ATTENTION_DIM = 4096
DTYPES = ('float32', 'bfloat16', 'float16')
# Each encoder subfolder: the model_type and architecture its config.json must name.
ENCODERS = {'text_encoder': ('clip_text_model', 'CLIPTextModelWithProjection'),
            'text_encoder_2': ('clip_text_model', 'CLIPTextModelWithProjection'),
            'text_encoder_3': ('t5', 'T5EncoderModel')}
# Each tokenizer subfolder: its class, and the file sets of which one must be there (without
# them transformers would quietly build an empty vocabulary).
_CLIP_FILES = (('tokenizer.json',), ('vocab.json', 'merges.txt'))
TOKENIZERS = {'tokenizer': ('CLIPTokenizer', _CLIP_FILES),
              'tokenizer_2': ('CLIPTokenizer', _CLIP_FILES),
              'tokenizer_3': ('T5Tokenizer', (('tokenizer.json',), ('spiece.model',)))}


def _check_encoder(root: Path, sub: str) -> dict:
  """The subfolder's config.json, after checking it names the model SD3 uses there."""
  if not (root / sub / 'config.json').is_file():
    raise FileNotFoundError(f'SD3 text encoder: {root / sub}: no config.json')
  config = read_json(root / sub / 'config.json')
  model_type, arch = ENCODERS[sub]
  if not isinstance(config, dict) or config.get('model_type') != model_type:
    got = config.get('model_type') if isinstance(config, dict) else config
    raise ValueError(f'SD3 text encoder: {root / sub}/config.json: model_type {got!r}, '
                     f'expected {model_type!r} ({arch})')
  if arch not in config.get('architectures', [arch]):
    raise ValueError(f'SD3 text encoder: {root / sub}/config.json: architectures '
                     f'{config["architectures"]}, expected {arch}')
  return config


def _check_tokenizer(root: Path, sub: str) -> None:
  cls, file_sets = TOKENIZERS[sub]
  folder = root / sub
  if not any(all((folder / f).is_file() for f in files) for files in file_sets):
    raise FileNotFoundError(f'SD3 text encoder: {folder}: no tokenizer files (one of '
                            f'{" or ".join(" + ".join(files) for files in file_sets)})')
  config = folder / 'tokenizer_config.json'
  named = read_json(config).get('tokenizer_class') if config.is_file() else None
  if named is not None and named.removesuffix('Fast') != cls:
    raise ValueError(f'SD3 text encoder: {config}: tokenizer_class {named!r}, expected {cls}')


class SD3TextEncoder:
  """SD3's three text encoders from a local diffusers folder; `encode` gives its conditioning.

  use_t5: None uses text_encoder_3 when the folder has it, True requires it, False skips it
  (SD3 then sees zeros for the T5 tokens, as diffusers does without text_encoder_3).
  """

  def __init__(self, path, device: str = 'auto', dtype: str = 'float32',
               max_sequence_length: int = 256, use_t5: bool | None = None):
    self.path = Path(path)
    if dtype not in DTYPES:
      raise ValueError(f'SD3 text encoder: dtype {dtype!r}, expected one of {DTYPES}')
    if max_sequence_length < 1:
      raise ValueError(f'SD3 text encoder: max_sequence_length must be >= 1, '
                       f'got {max_sequence_length}')
    self.max_sequence_length, self.dtype_name = max_sequence_length, dtype
    # The whole folder is checked before any weights load, so a bad one fails fast.
    self._check_folder(use_t5)
    self._load(device)

  def _check_folder(self, use_t5: bool | None) -> None:
    """Sets use_t5, width and pooled_width from the folder's configs, checking them."""
    if not self.path.is_dir():
      raise FileNotFoundError(f'SD3 text encoder: {self.path}: no such weights folder')
    has_t5 = (self.path / 'text_encoder_3').is_dir()
    if use_t5 and not has_t5:
      raise FileNotFoundError(f'SD3 text encoder: {self.path}: no text_encoder_3 subfolder '
                              f'(T5 was required)')
    self.use_t5 = has_t5 if use_t5 is None else use_t5
    parts = ['text_encoder', 'text_encoder_2', 'tokenizer', 'tokenizer_2']
    parts += ['text_encoder_3', 'tokenizer_3'] if self.use_t5 else []
    for sub in parts:
      if not (self.path / sub).is_dir():
        raise FileNotFoundError(f'SD3 text encoder: {self.path}: no {sub} subfolder')
    configs = {sub: _check_encoder(self.path, sub) for sub in parts if sub in ENCODERS}
    for sub in parts:
      if sub in TOKENIZERS:
        _check_tokenizer(self.path, sub)
    clips = [configs['text_encoder'], configs['text_encoder_2']]
    self.pooled_width = sum(c['projection_dim'] for c in clips)
    joint = self._joint_attention_dim()
    if self.use_t5:
      self.width = configs['text_encoder_3']['d_model']
      if joint is not None and joint != self.width:
        raise ValueError(f'SD3 text encoder: {self.path}: text_encoder_3 d_model {self.width} '
                         f'!= transformer joint_attention_dim {joint}')
    else:
      self.width = joint or SD3_JOINT_ATTENTION_DIM
    clip_width = sum(c['hidden_size'] for c in clips)
    if clip_width > self.width:
      raise ValueError(f'SD3 text encoder: {self.path}: CLIP-L + CLIP-G hidden sizes '
                       f'{clip_width} exceed the states width {self.width}')

  def _joint_attention_dim(self) -> int | None:
    path = self.path / 'transformer' / 'config.json'
    return read_json(path).get('joint_attention_dim') if path.is_file() else None

  def _load(self, device: str) -> None:
    import torch
    from transformers import (CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel,
                              T5Tokenizer)
    self.device = hf.pick_device('SD3 text encoder', device)
    self.dtype = getattr(torch, self.dtype_name)

    def load(cls, sub, **model_options):
      try:
        return cls.from_pretrained(self.path / sub, local_files_only=True, **model_options)
      except (OSError, ValueError) as e:
        raise ValueError(f'SD3 text encoder: {self.path / sub}: cannot load {cls.__name__} '
                         f'({e})') from None

    def load_model(cls, sub):
      model = load(cls, sub, use_safetensors=True, dtype=self.dtype)
      return model.to(self.device).eval()

    self.clips = [(load(CLIPTokenizer, tok), load_model(CLIPTextModelWithProjection, enc))
                  for tok, enc in (('tokenizer', 'text_encoder'),
                                   ('tokenizer_2', 'text_encoder_2'))]
    self.t5 = ((load(T5Tokenizer, 'tokenizer_3'), load_model(T5EncoderModel, 'text_encoder_3'))
               if self.use_t5 else None)
    for tokenizer, model in self.clips + ([self.t5] if self.t5 else []):
      if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f'SD3 text encoder: {self.path}: {tokenizer.name_or_path} has '
                         f'{len(tokenizer)} tokens, its model only {model.config.vocab_size}')
    # Both CLIPs read the first tokenizer's length (77 in SD3), as diffusers does.
    self.clip_length = self.clips[0][0].model_max_length
    for _, model in self.clips:
      if self.clip_length > model.config.max_position_embeddings:
        raise ValueError(f'SD3 text encoder: {self.path}/tokenizer: model_max_length '
                         f'{self.clip_length} exceeds {model.name_or_path}\'s '
                         f'{model.config.max_position_embeddings} positions')

  @property
  def metadata(self) -> dict[str, str]:
    """What the embeddings depend on; a table only grows with embeddings made the same way."""
    return {'format': FORMAT, 'weights': str(self.path.resolve()), 'composition': COMPOSITION,
            't5': str(self.use_t5).lower(), 'clip_length': str(self.clip_length),
            'max_sequence_length': str(self.max_sequence_length),
            'width': str(self.width), 'pooled_width': str(self.pooled_width),
            'dtype': self.dtype_name}

  def encode(self, texts: list[str], batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """states float32 [N, clip_length + max_sequence_length, width], pooled float32
    [N, pooled_width], computed batch_size texts at a time."""
    import torch
    texts = [str(t) for t in texts]
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    states = np.zeros((len(texts), self.clip_length + self.max_sequence_length, self.width),
                      np.float32)
    pooled = np.zeros((len(texts), self.pooled_width), np.float32)
    with torch.inference_mode():
      for i in range(0, len(texts), batch_size):
        s, p = self._encode_batch(texts[i:i + batch_size])
        states[i:i + len(s)], pooled[i:i + len(p)] = s, p
    return states, pooled

  def _encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    import torch
    clip_states, clip_pooled = [], []
    for tokenizer, model in self.clips:
      ids = tokenizer(texts, padding='max_length', max_length=self.clip_length,
                      truncation=True, return_tensors='pt').input_ids
      out = model(ids.to(self.device), output_hidden_states=True)
      clip_states.append(out.hidden_states[-2])  # penultimate layer (SD3: clip_skip None)
      clip_pooled.append(out.text_embeds)
    clip = torch.cat(clip_states, -1)
    clip = torch.nn.functional.pad(clip, (0, self.width - clip.shape[-1]))
    if self.t5 is None:
      t5 = torch.zeros(len(texts), self.max_sequence_length, self.width, dtype=clip.dtype,
                       device=self.device)
    else:
      tokenizer, model = self.t5
      ids = tokenizer(texts, padding='max_length', max_length=self.max_sequence_length,
                      truncation=True, add_special_tokens=True, return_tensors='pt').input_ids
      t5 = model(ids.to(self.device)).last_hidden_state.to(clip.dtype)
    states = torch.cat([clip, t5], 1)
    pooled = torch.cat(clip_pooled, -1)
    return states.float().cpu().numpy(), pooled.float().cpu().numpy()


def collect_texts(samples) -> list[str]:
  """Every text training can condition on for `samples` (a folder of sample folders, or an
  iterable of sample folders / LayeredSamples), sorted, the empty text included."""
  from layerjax.data.pipeline import text_for
  if isinstance(samples, (str, Path)):
    folders = schema.sample_folders(samples)
    if not folders:
      raise ValueError(f'{samples}: no sample folders')
    samples = folders
  texts = {''}
  for item in samples:
    sample = item if isinstance(item, schema.LayeredSample) else schema.read_folder(item)
    # A training example refers to one object layer; text prompts use that layer's text.
    texts.update(text_for(layer) for layer in sample.layers if layer.kind == 'object')
  return sorted(texts)


def _read_table(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  from safetensors import SafetensorError, safe_open
  try:
    with safe_open(str(path), 'np') as f:
      return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
  except (SafetensorError, OSError) as e:
    raise ValueError(f'{path}: not a readable safetensors table ({e})') from None


def write_table(path, texts: Iterable[str], encoder: SD3TextEncoder,
                batch_size: int = 16) -> dict:
  """Adds the embeddings of the texts `path` lacks (creating it if needed) and rewrites it
  atomically; entries already there are kept as they are. Returns the counts."""
  from safetensors.numpy import save_file
  from layerjax.models.shared import TextEmbeddings
  path = Path(path)
  wanted = sorted({str(t) for t in texts})
  tensors, metadata = _read_table(path) if path.exists() else ({}, encoder.metadata)
  if metadata != encoder.metadata:
    differ = sorted(k for k in {**metadata, **encoder.metadata}
                    if metadata.get(k) != encoder.metadata.get(k))
    raise ValueError(f'{path}: made with other settings ({", ".join(differ)}: '
                     f'{[metadata.get(k) for k in differ]} here, now '
                     f'{[encoder.metadata.get(k) for k in differ]}); remove it or write '
                     f'another file')
  missing = [t for t in wanted if f'{TextEmbeddings.key(t)}.states' not in tensors]
  if missing:
    states, pooled = encoder.encode(missing, batch_size)
    for text, s, p in zip(missing, states, pooled):
      tensors[f'{TextEmbeddings.key(text)}.states'] = s
      tensors[f'{TextEmbeddings.key(text)}.pooled'] = p
    with atomic_file(path) as tmp:
      save_file(tensors, str(tmp), metadata=encoder.metadata)
  return {'texts': len(wanted), 'new': len(missing), 'in_table': len(tensors) // 2}


def add_subcommand(subparsers) -> None:
  """`embed-texts` for `python -m data_engine`; `handle(args)` runs it."""
  p = subparsers.add_parser('embed-texts', help='SD3 text embeddings for the texts of samples',
                            description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--samples', required=True, type=Path,
                 help="a folder of sample folders (an engine output's DIR/samples)")
  p.add_argument('--weights', required=True, type=Path, help='a local SD3 diffusers folder')
  p.add_argument('--out', required=True, type=Path,
                 help='the safetensors table (training: model.text.embeddings)')
  p.add_argument('--batch-size', type=cli.int_at_least(1), default=16)
  p.add_argument('--device', default='auto', help="'auto' (CUDA when available), 'cpu', ...")
  p.add_argument('--dtype', choices=DTYPES, default='float32', help='compute dtype')
  p.add_argument('--max-sequence-length', type=cli.int_at_least(1), default=256,
                 help='T5 tokens')
  p.add_argument('--no-t5', action='store_true', help='zeros for the T5 tokens')


def handle(args: argparse.Namespace) -> int:
  start = time.time()
  # The encoder checks the weights folder first: a bad configuration fails before any work.
  encoder = SD3TextEncoder(args.weights, args.device, args.dtype, args.max_sequence_length,
                           use_t5=False if args.no_t5 else None)
  counts = write_table(args.out, collect_texts(args.samples), encoder, args.batch_size)
  print(json.dumps({'table': str(args.out), 'weights': str(args.weights), **counts,
                    't5': encoder.use_t5, 'seconds': round(time.time() - start, 2)}, indent=2))
  return 0
