"""SD3 text embeddings computed by the engine: against diffusers' own `encode_prompt`, the
table training reads, incremental re-runs, bad weight folders and the CLI.

The SD3 folder is a tiny random one written by diffusers' `StableDiffusion3Pipeline.
save_pretrained` (two CLIPs of widths 32 / 48, a T5 of width 96 > 32 + 48, a transformer
whose joint_attention_dim is 96); the code under test loads it from disk.
"""

import argparse
import dataclasses
import json
import shutil

import numpy as np
import pytest

from conftest import assert_parity, torch_reference
from data_engine import text_embeddings as te
from layerjax.data import schema
from layerjax.models.shared import TextEmbeddings
from test_schema import make_sample

L = 12  # T5 tokens
TEXTS = ['', 'the red ball', 'A dog, and the cat!', 'the ' * 40 + 'end', 'ünïcode dog']
LETTERS = 'abcdefghijklmnopqrstuvwxyz'


def clip_tokenizer(pad: str):
  from transformers import CLIPTokenizer
  vocab = {'<|startoftext|>': 0, '<|endoftext|>': 1, '!': 2}
  for c in LETTERS:
    vocab[c], vocab[c + '</w>'] = len(vocab), len(vocab) + 1
  merges = [('t', 'h'), ('th', 'e</w>'), ('a', 'n'), ('an', 'd</w>')]
  for a, b in merges:
    vocab[a + b] = len(vocab)
  return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad, model_max_length=77)


def t5_tokenizer():
  from transformers import T5Tokenizer
  pieces = [('<pad>', 0.0), ('</s>', 0.0), ('<unk>', 0.0), ('▁', -2.0)]
  pieces += [(c, -3.0) for c in LETTERS] + [('▁' + w, -1.0) for w in ('the', 'red', 'dog')]
  return T5Tokenizer(vocab=pieces, extra_ids=0)


def clip_model(hidden: int, projection: int, vocab_size: int, seed: int):
  import torch
  from transformers import CLIPTextConfig, CLIPTextModelWithProjection
  torch.manual_seed(seed)
  return CLIPTextModelWithProjection(CLIPTextConfig(
      vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
      projection_dim=projection, num_hidden_layers=2, num_attention_heads=2,
      max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()


@pytest.fixture(scope='module')
def sd3(tmp_path_factory):
  """(folder with T5, folder without T5, diffusers pipeline with T5, pipeline without)."""
  import torch
  from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                         StableDiffusion3Pipeline)
  from transformers import T5Config, T5EncoderModel
  tok, tok2, tok3 = clip_tokenizer('<|endoftext|>'), clip_tokenizer('!'), t5_tokenizer()
  torch.manual_seed(2)
  t5 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=96, d_kv=16, d_ff=128,
                               num_layers=2, num_heads=2)).eval()
  parts = dict(
      transformer=SD3Transformer2DModel(
          sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=96,
          caption_projection_dim=16, pooled_projection_dim=40, pos_embed_max_size=16),
      scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
      text_encoder=clip_model(32, 16, len(tok), 0), tokenizer=tok,
      text_encoder_2=clip_model(48, 24, len(tok2), 1), tokenizer_2=tok2)
  pipe = StableDiffusion3Pipeline(**parts, text_encoder_3=t5, tokenizer_3=tok3)
  pipe_no_t5 = StableDiffusion3Pipeline(**parts, text_encoder_3=None, tokenizer_3=None)
  root = tmp_path_factory.mktemp('sd3')
  pipe.save_pretrained(root / 'full', safe_serialization=True)
  shutil.copytree(root / 'full', root / 'no_t5',
                  ignore=shutil.ignore_patterns('text_encoder_3', 'tokenizer_3'))
  return root / 'full', root / 'no_t5', pipe, pipe_no_t5


@pytest.fixture(scope='module')
def encoder(sd3):
  return te.SD3TextEncoder(sd3[0], device='cpu', max_sequence_length=L)


def reference(pipe, texts, precision):
  """diffusers' `encode_prompt` (states, pooled) with the pipeline's text encoders in
  `precision` ('float32', 'bfloat16' or 'float64')."""
  import torch
  with torch.no_grad():
    states, _, pooled, _ = torch_reference(pipe, precision).encode_prompt(
        prompt=texts, prompt_2=None, prompt_3=None, device=torch.device('cpu'),
        do_classifier_free_guidance=False, max_sequence_length=L)
  return states.double().numpy(), pooled.double().numpy()


def assert_matches_encode_prompt(embeddings, pipe, texts, precision='float32'):
  """The engine's (states, pooled) against diffusers' in float64, bounded by diffusers' own
  error in `precision`."""
  low, ref = reference(pipe, texts, precision), reference(pipe, texts, 'float64')
  for ours, torch_low, ref64 in zip(embeddings, low, ref):
    assert_parity(ours, torch_low, ref64, precision)


def test_matches_diffusers_encode_prompt(sd3, encoder):
  states, pooled = encoder.encode(TEXTS, batch_size=2)
  assert states.shape == (5, 77 + L, 96) and pooled.shape == (5, 40)
  assert states.dtype == pooled.dtype == np.float32
  assert_matches_encode_prompt((states, pooled), sd3[2], TEXTS)
  assert np.abs(states[:, 77:]).min(axis=-1).max() > 0  # T5 tokens are real, not zeros
  assert encoder.use_t5 and encoder.metadata['t5'] == 'true'


def test_bf16_matches_diffusers_encode_prompt(sd3):
  bf16 = te.SD3TextEncoder(sd3[0], device='cpu', dtype='bfloat16', max_sequence_length=L)
  embeddings = bf16.encode(TEXTS, batch_size=2)
  assert all(e.dtype == np.float32 for e in embeddings)
  assert_matches_encode_prompt(embeddings, sd3[2], TEXTS, 'bfloat16')


def test_without_t5_matches_diffusers(sd3, encoder):
  no_t5 = te.SD3TextEncoder(sd3[1], device='cpu', max_sequence_length=L)
  states, pooled = no_t5.encode(TEXTS[:3])
  assert_matches_encode_prompt((states, pooled), sd3[3], TEXTS[:3])
  assert not no_t5.use_t5 and states.shape == (3, 77 + L, 96)
  assert (states[:, 77:] == 0).all()
  # Skipping T5 in a folder that has it gives the same; requiring it where absent fails.
  skipped = te.SD3TextEncoder(sd3[0], device='cpu', max_sequence_length=L, use_t5=False)
  np.testing.assert_array_equal(skipped.encode(TEXTS[:3])[0], states)
  with pytest.raises(FileNotFoundError, match='no text_encoder_3 subfolder'):
    te.SD3TextEncoder(sd3[1], device='cpu', use_t5=True)


def test_table_round_trip_through_training_loader(tmp_path, encoder):
  path = tmp_path / 'emb' / 'text.safetensors'
  counts = te.write_table(path, TEXTS + ['the red ball'], encoder, batch_size=3)
  assert counts == {'texts': 5, 'new': 5, 'in_table': 5}
  table = TextEmbeddings(path)
  states, pooled = table(['the red ball', ''])
  # The table was encoded in batches of 3, these in one of 2: torch's CPU matmuls round by
  # batch shape (1 ulp of the pooled embedding on a Xeon, model 207), and a wrong row or text
  # would be off by O(1).
  for got, want in zip((states, pooled), encoder.encode(['the red ball', ''])):
    np.testing.assert_allclose(got, want, rtol=0,
                               atol=8 * np.finfo(np.float32).eps * np.abs(want).max())
  from safetensors import safe_open
  with safe_open(str(path), 'np') as f:
    meta = f.metadata()
  assert meta['weights'] == str(encoder.path.resolve())
  assert meta['composition'] == te.COMPOSITION and meta['max_sequence_length'] == str(L)
  assert [p.name for p in path.parent.iterdir()] == ['text.safetensors']  # no temp file left


def test_incremental_rerun_encodes_only_new_texts(tmp_path, encoder, monkeypatch):
  path = tmp_path / 'text.safetensors'
  te.write_table(path, TEXTS[:2], encoder)
  before = TextEmbeddings(path).tensors
  calls = []
  encode = encoder.encode
  monkeypatch.setattr(encoder, 'encode', lambda texts, bs: calls.append(texts) or
                      encode(texts, bs))
  counts = te.write_table(path, TEXTS, encoder)
  assert counts == {'texts': 5, 'new': 3, 'in_table': 5}
  assert calls == [sorted(TEXTS[2:])]
  after = TextEmbeddings(path).tensors
  assert set(before) < set(after) and len(after) == 10
  for k, v in before.items():
    assert after[k].tobytes() == v.tobytes()
  data = path.read_bytes()
  assert te.write_table(path, TEXTS[1:3], encoder)['new'] == 0
  assert len(calls) == 1 and path.read_bytes() == data  # nothing new: the file is untouched


def test_table_made_otherwise_is_not_mixed(tmp_path, sd3, encoder):
  path = tmp_path / 'text.safetensors'
  te.write_table(path, ['a'], encoder)
  shorter = te.SD3TextEncoder(sd3[0], device='cpu', max_sequence_length=L - 4)
  with pytest.raises(ValueError, match='other settings.*max_sequence_length'):
    te.write_table(path, ['b'], shorter)
  path.write_bytes(b'not safetensors')
  with pytest.raises(ValueError, match='not a readable safetensors table'):
    te.write_table(path, ['b'], encoder)


def edited_copy(src, dst, sub, file='config.json', **config):
  shutil.copytree(src, dst)
  path = dst / sub / file
  path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
  return dst


def test_bad_weight_folders_fail_at_construction(tmp_path, sd3):
  full = sd3[0]
  with pytest.raises(FileNotFoundError, match=f'{tmp_path}/missing: no such weights folder'):
    te.SD3TextEncoder(tmp_path / 'missing')
  no_clip_g = tmp_path / 'no_clip_g'
  shutil.copytree(full, no_clip_g, ignore=shutil.ignore_patterns('text_encoder_2'))
  with pytest.raises(FileNotFoundError, match=f'{no_clip_g}: no text_encoder_2 subfolder'):
    te.SD3TextEncoder(no_clip_g)
  no_tok = tmp_path / 'no_tok'
  shutil.copytree(full, no_tok, ignore=shutil.ignore_patterns('tokenizer'))
  with pytest.raises(FileNotFoundError, match=f'{no_tok}: no tokenizer subfolder'):
    te.SD3TextEncoder(no_tok)
  wrong = edited_copy(full, tmp_path / 'wrong_type', 'text_encoder', model_type='t5')
  with pytest.raises(ValueError, match=r"text_encoder/config.json: model_type 't5', "
                                       r"expected 'clip_text_model'"):
    te.SD3TextEncoder(wrong)
  wrong = edited_copy(full, tmp_path / 'wrong_arch', 'text_encoder_3',
                      architectures=['T5ForConditionalGeneration'])
  with pytest.raises(ValueError, match='text_encoder_3/config.json: architectures'):
    te.SD3TextEncoder(wrong)
  wrong = edited_copy(full, tmp_path / 'wrong_tok', 'tokenizer_2', 'tokenizer_config.json',
                      tokenizer_class='T5Tokenizer')
  with pytest.raises(ValueError, match="tokenizer_class 'T5Tokenizer', expected CLIPTokenizer"):
    te.SD3TextEncoder(wrong)
  empty_tok = tmp_path / 'empty_tok'
  shutil.copytree(full, empty_tok, ignore=shutil.ignore_patterns('tokenizer.json'))
  with pytest.raises(FileNotFoundError, match=f'{empty_tok}/tokenizer: no tokenizer files'):
    te.SD3TextEncoder(empty_tok)
  narrow = edited_copy(full, tmp_path / 'narrow', 'text_encoder_3', d_model=64)
  with pytest.raises(ValueError, match='text_encoder_3 d_model 64 != transformer'):
    te.SD3TextEncoder(narrow)
  long = edited_copy(full, tmp_path / 'long', 'tokenizer', 'tokenizer_config.json',
                     model_max_length=100)
  with pytest.raises(ValueError, match='model_max_length 100 exceeds .*77 positions'):
    te.SD3TextEncoder(long, device='cpu')
  with pytest.raises(ValueError, match="device 'gpu'"):
    te.SD3TextEncoder(full, device='gpu')
  no_weights = tmp_path / 'no_weights'
  shutil.copytree(full, no_weights)
  (no_weights / 'text_encoder_2' / 'model.safetensors').unlink()
  with pytest.raises(ValueError, match=f'{no_weights}/text_encoder_2: cannot load'):
    te.SD3TextEncoder(no_weights)


def text_sample(seed: int, **texts):
  sample = make_sample(seed=seed)
  sample.layers[2] = dataclasses.replace(sample.layers[2], **texts)
  return sample


def run_cli(argv):
  parser = argparse.ArgumentParser()
  te.add_subcommand(parser.add_subparsers(dest='command', required=True))
  return te.handle(parser.parse_args(argv))


def test_collect_texts_and_cli_end_to_end(tmp_path, sd3, encoder, capsys):
  samples = tmp_path / 'out' / 'samples'
  for s in (text_sample(0), text_sample(1, referring=(), caption=''),
            text_sample(2, referring=(), caption='', label='')):
    schema.write_folder(s, samples / s.id)
  # The first non-empty of referring, caption, label; '' for prompts without text.
  assert te.collect_texts(samples) == ['', 'ball', 'the ball on the right']
  assert te.collect_texts([text_sample(3, referring=('x', 'y'))]) == ['', 'x']
  table = tmp_path / 'text.safetensors'
  argv = ['embed-texts', '--samples', str(samples), '--weights', str(sd3[0]), '--out',
          str(table), '--batch-size', '2', '--device', 'cpu', '--max-sequence-length', str(L)]
  assert run_cli(argv) == 0
  summary = json.loads(capsys.readouterr().out)
  assert (summary['texts'], summary['new'], summary['t5']) == (3, 3, True)
  states, pooled = TextEmbeddings(table)(['the ball on the right', 'ball', ''])
  want_states, want_pooled = encoder.encode(['the ball on the right', 'ball', ''])
  np.testing.assert_allclose(states, want_states, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pooled, want_pooled, rtol=1e-5, atol=1e-6)
  s = text_sample(4, referring=('the small ball',))
  schema.write_folder(s, samples / s.id)
  assert run_cli(argv) == 0
  assert json.loads(capsys.readouterr().out)['new'] == 1
  with pytest.raises(FileNotFoundError, match='no such weights folder'):
    run_cli([*argv[:4], str(tmp_path / 'nowhere'), *argv[5:]])
