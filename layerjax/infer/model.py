"""The decomposer as users get it: `pack` turns a training workdir into a model folder (the
config and the EMA weights, no optimizer state), `load` reads such a folder, or a workdir
directly, into a `LayerDecomposer` placed on a mesh, in the dtype asked for, and
`JaxBackend` runs it for `layerjax.infer.decomposer.Decomposer`.

    MODEL/decomposer.json      format, step, source workdir, the experiment config and the
                               resolved `DecomposerConfig` (architecture and dtypes), so
                               `init.pretrained` is never read again
    MODEL/weights.safetensors  every variable of the model by its nnx state path
                               ('transformer/transformer_blocks/0/attn/to_q/kernel'), in the
                               dtype it was trained in: the EMA weights and the frozen parts
                               (the VAE, buffers); the MMDiT's stacked blocks one by one
                               (`mmdit.unstack`), so files do not depend on how they are held
    MODEL/text.safetensors     models reading precomputed text embeddings only: the empty
                               text's embedding (`TextEmbeddings`' format), so spatial
                               prompts and guidance work without the embeddings file

A workdir is read without ever building optimizer state: only `ema` and `step` are restored
from its Orbax checkpoint; the frozen parts are rebuilt as the trainer built them (random
from `config.seed`, or from `init.pretrained`), since the checkpoint does not hold them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from layerjax import build, checkpoints, flow, parallel
from layerjax.fileio import Artifact, as_path, atomic_dir, check_destination, is_url, read_json
from layerjax.models import common, mmdit
from layerjax.models.decomposer import (TRAINABLE, DecomposerConfig, LayerDecomposer,
                                        TextEncoderConfig)
from layerjax.models.mmdit import MMDiTConfig
from layerjax.models.shared import TextEmbeddings, embedding_lookup, tokenize
from layerjax.models.vae import VAEConfig

FORMAT = 'layerjax.decomposer/1'
META = 'decomposer.json'
WEIGHTS = 'weights.safetensors'
TEXT = 'text.safetensors'
MODEL_FOLDER = Artifact('decomposer model', lambda p: (p / META).is_file(), markers=(META,))
DTYPE_CHOICES = ('float32', 'bfloat16')


class ModelError(ValueError):
  """A folder that cannot be loaded as asked; the message names the path and the problem."""


@dataclasses.dataclass
class LoadedModel:
  model: LayerDecomposer  # the EMA weights; placed on the mesh `load` was given
  config: ml_collections.ConfigDict  # the experiment config it was trained with
  step: int
  source: str  # the folder it came from (packed model or workdir)
  # Precomputed text embeddings it came with: the packed empty text, or a workdir's
  # `model.text.embeddings` file; None for the byte encoder or when the file is gone.
  texts: TextEmbeddings | None = None


# --- the resolved architecture as JSON ------------------------------------------------------

def config_json(cfg: DecomposerConfig) -> dict:
  """`cfg` as plain JSON values; dtypes by name."""
  def plain(x):
    if dataclasses.is_dataclass(x):
      return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, (tuple, list)):
      return [plain(v) for v in x]
    if x is None or isinstance(x, (str, int, float)):
      return x
    return jnp.dtype(x).name  # compute and parameter dtypes
  return plain(cfg)


def config_from_json(d: dict, dtype: str | None = None) -> DecomposerConfig:
  """The inverse of `config_json`; `dtype` ('float32' / 'bfloat16') replaces the compute and
  parameter dtypes of every part."""
  def compute(sub: dict) -> dict:
    return {**sub, **{k: build.DTYPES[dtype or sub[k]] for k in ('dtype', 'param_dtype')}}
  return DecomposerConfig(**{
      **d, 'mmdit': MMDiTConfig(**compute(d['mmdit'])),
      'vae': VAEConfig(**compute(d['vae'])) if d['vae'] else None,
      'text': TextEncoderConfig(**d['text']) if d['text'] else None})


# --- filling an abstract model ------------------------------------------------------------

def _key(path: tuple) -> str:
  return '/'.join(map(str, path))


def _abstract(cfg: DecomposerConfig) -> LayerDecomposer:
  return common.abstract(lambda rngs: LayerDecomposer(cfg, rngs=rngs))


def _default_mesh(mesh) -> jax.sharding.Mesh:
  return mesh if mesh is not None else parallel.make_mesh((1, 1, 1), jax.devices()[:1])


def _filled(abstract: LayerDecomposer, value: Callable[[tuple, tuple], Any],
            mesh) -> LayerDecomposer:
  """`abstract` with each variable `value(path, shape)`, cast to the variable's dtype and
  placed as `parallel.model_shardings` says; host arrays are sliced per device, never copied
  whole to one device first."""
  shardings = dict(nnx.to_flat_state(parallel.model_shardings(abstract, mesh)))
  graphdef, state = nnx.split(abstract)
  for path, var in nnx.to_flat_state(state):
    x, sharding, dtype = value(path, var.shape), shardings[path], var.dtype
    if isinstance(x, jax.Array):
      x = jax.device_put(x.astype(dtype), sharding)
    else:
      x = jax.make_array_from_callback(
          var.shape, sharding, lambda index, x=x: np.asarray(x[index]).astype(dtype))
    var.set_value(x)
  return nnx.merge(graphdef, state)


# --- where a model comes from -------------------------------------------------------------

def _kind(path) -> str:
  path = as_path(path)
  if (path / META).is_file():
    return 'packed'
  if (path / 'checkpoints').is_dir():
    return 'workdir'
  what = 'no such folder' if not path.exists() else (
      f'neither a packed decomposer model (no {META}) nor a training workdir (no checkpoints/)')
  raise ModelError(f'{path}: {what}')


@dataclasses.dataclass
class _Workdir:
  """A checked workdir: its config, the step to load and its checkpoints, nothing loaded."""
  path: Any
  config: ml_collections.ConfigDict
  step: int
  checkpoints: checkpoints.Checkpoints


def _open_workdir(path, step: int | None, config=None) -> _Workdir:
  path = as_path(path)
  config_file = path / checkpoints.CONFIG
  if config_file.is_file():
    config = ml_collections.ConfigDict(read_json(config_file, ModelError))
  elif config is None:
    raise ModelError(f'{config_file}: missing; the workdir does not record the config it was '
                     'trained with (runs before layerjax recorded it): give it (config=)')
  ckpt = checkpoints.Checkpoints(path / 'checkpoints', config.keep_checkpoints, async_save=False,
                             read_only=True)
  steps = ckpt.steps()
  if not steps:
    ckpt.close()
    raise ModelError(f'{path}/checkpoints: holds no checkpoint')
  if step is None:
    step = steps[-1]
  elif step not in steps:
    ckpt.close()
    raise ModelError(f'{path}/checkpoints: no step {step} (steps there: {steps})')
  build.model_config(config)  # `init.pretrained` there and valid, before any weight is read
  return _Workdir(path, config, step, ckpt)


def _embeddings_file(config) -> TextEmbeddings | None:
  t = config.model.text
  if t.encoder != 'precomputed' or not t.embeddings or not Path(t.embeddings).is_file():
    return None
  return TextEmbeddings(t.embeddings)


def _load_workdir(w: _Workdir, mesh, dtype: str | None) -> LoadedModel:
  """The EMA weights of step `w.step` and the frozen parts the trainer builds."""
  cfg = config_from_json(config_json(build.model_config(w.config)), dtype)
  abstract = _abstract(cfg)
  mesh = _default_mesh(mesh)
  # The frozen parts as the trainer makes them (`trainer.create`); its trainable weights are
  # dropped before the EMA weights are read, so the two are never held together.
  frozen = nnx.split(build.build_model(w.config, w.config.seed), TRAINABLE, ...)[2]
  values = {_key(p): v[...] for p, v in nnx.to_flat_state(frozen)}
  del frozen
  shardings = dict(nnx.to_flat_state(parallel.model_shardings(abstract, mesh)))
  ema = nnx.state(abstract, TRAINABLE)
  for path, var in nnx.to_flat_state(ema):  # the restore target: shape, dtype and placement
    var.set_value(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=shardings[path]))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  target = {'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), 'ema': ema}
  restored = w.checkpoints.restore(w.step, target, partial=True)
  w.checkpoints.close()
  values.update({_key(p): v[...] for p, v in nnx.to_flat_state(restored['ema'])})
  return LoadedModel(_filled(abstract, lambda path, _: values[_key(path)], mesh), w.config,
                     int(restored['step']), str(w.path), _embeddings_file(w.config))


def _read_meta(folder) -> dict:
  path = folder / META
  meta = read_json(path, ModelError)
  if not isinstance(meta, dict) or meta.get('format') != FORMAT:
    got = meta.get('format') if isinstance(meta, dict) else None
    raise ModelError(f'{path}: format {got!r}; this layerjax reads {FORMAT!r} (pack the '
                     'workdir again with this version)')
  missing = [k for k in ('step', 'source', 'config', 'model') if k not in meta]
  if missing:
    raise ModelError(f'{path}: malformed, no {missing}')
  return meta


def _check_weights(path: Path, abstract: LayerDecomposer, meta_path) -> None:
  """Every tensor of the file is a variable of the architecture, of its shape, and back."""
  try:
    with safe_open(str(path), framework='np') as f:
      have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
  except (SafetensorError, OSError) as e:
    raise ModelError(f'{path}: not a readable safetensors file ({e})') from None
  want = {_key(p): x.shape for stacked, v in nnx.to_flat_state(nnx.state(abstract))
          for p, x in mmdit.unstack(stacked, mmdit.shape_only(v.shape))}
  shown = lambda names: f'{names[:5]}' + (f' and {len(names) - 5} more' if len(names) > 5 else '')
  problems = []
  for what, names in (('missing', sorted(set(want) - set(have))),
                      ('unexpected', sorted(set(have) - set(want)))):
    if names:
      problems.append(f'{what} {shown(names)}')
  shapes = [f'{k} {have[k]} (expected {want[k]})' for k in sorted(set(have) & set(want))
            if have[k] != want[k]]
  if shapes:
    problems.append(f'shapes {shown(shapes)}')
  if problems:
    raise ModelError(f'{path}: does not match the architecture in {meta_path}: '
                     + '; '.join(problems))


# A packed file is opened anew after this many bytes read through one mapping: the pages a
# mapping has read stay in the resident set until it is closed. One mapping over the whole
# file: a peak of 3.3 GiB to load an SD3-medium-shaped model of 1.5 GB; 2.1 GiB like this,
# 1.9 with the file opened per variable, which costs 4 ms an opening (2.4 s for 588 tensors).
_MAPPED_BYTES = 256 << 20


def _load_packed(folder, step: int | None, mesh, dtype: str | None) -> LoadedModel:
  if is_url(folder):
    raise ModelError(f'{folder}: a packed model is read from a local folder; copy it first '
                     f'(gcloud storage cp -r {folder} .)')
  folder = Path(folder)
  meta = _read_meta(folder)
  if step is not None and step != meta['step']:
    raise ModelError(f'{folder}: a packed model of step {meta["step"]} only, not step {step}')
  abstract = _abstract(config_from_json(meta['model'], dtype))
  _check_weights(folder / WEIGHTS, abstract, folder / META)
  mapped = []  # [the open file, bytes read through it]; see _MAPPED_BYTES

  def tensor(path, _):
    if not mapped or mapped[1] > _MAPPED_BYTES:
      mapped[:] = [safe_open(str(folder / WEIGHTS), framework='np'), 0]
    x = mapped[0].get_tensor(_key(path))
    mapped[1] += x.nbytes
    return x

  model = _filled(abstract, lambda path, shape: mmdit.stack(path, shape, tensor),
                  _default_mesh(mesh))
  mapped.clear()
  texts = TextEmbeddings(folder / TEXT) if (folder / TEXT).is_file() else None
  return LoadedModel(model, ml_collections.ConfigDict(meta['config']), int(meta['step']),
                     str(folder), texts)


# --- the API ------------------------------------------------------------------------------

def experiment_config(path) -> ml_collections.ConfigDict:
  """The experiment config a packed model folder or a training workdir was trained with;
  no weights are read."""
  if _kind(path) == 'packed':
    return ml_collections.ConfigDict(_read_meta(Path(path))['config'])
  config_file = as_path(path) / checkpoints.CONFIG
  if not config_file.is_file():
    raise ModelError(f'{config_file}: missing; the workdir does not record the config it was '
                     'trained with')
  return ml_collections.ConfigDict(read_json(config_file, ModelError))


def load(path, *, step: int | None = None, mesh: jax.sharding.Mesh | None = None,
         dtype: str | None = None, config=None) -> LoadedModel:
  """A packed model folder or a training workdir (its latest step, or `step`), its weights
  placed on `mesh` (default: the first device) by the model's logical axes. `dtype`: None
  keeps the trained dtypes, 'float32' or 'bfloat16' sets every part's parameter and compute
  dtype (weights are cast as they are placed, never held in both). `config`: the experiment
  config of a workdir that does not record it (trained before layerjax wrote config.json);
  a recorded one wins."""
  if dtype is not None and dtype not in DTYPE_CHOICES:
    raise ModelError(f'dtype {dtype!r}: expected one of {DTYPE_CHOICES} or None (as trained)')
  if _kind(path) == 'packed':
    return _load_packed(path, step, mesh, dtype)
  return _load_workdir(_open_workdir(path, step, config), mesh, dtype)


def pack(workdir, out, *, step: int | None = None, overwrite: bool = False,
         config=None) -> Path:
  """Writes the model of `workdir` (latest step, or `step`) to the folder `out`, atomically;
  a model folder there is replaced only with `overwrite`, anything else is refused.
  `config`: as `load`'s."""
  check_destination(out, MODEL_FOLDER, overwrite)
  if _kind(workdir) != 'workdir':
    raise ModelError(f'{workdir}: a packed model already, not a training workdir')
  w = _open_workdir(workdir, step, config)
  needs_text = w.config.model.text.encoder == 'precomputed'
  if needs_text and _embeddings_file(w.config) is None:
    w.checkpoints.close()
    raise ModelError(f'model.text.embeddings: {w.config.model.text.embeddings!r}: no such '
                     f"file; {workdir}'s model reads precomputed text embeddings and the "
                     "packed model keeps the empty text's")
  return save(_load_workdir(w, None, None), out, overwrite=overwrite)


def save(loaded: LoadedModel, out, *, overwrite: bool = False) -> Path:
  """Writes `loaded` (e.g. `load`'s, or a model built in memory) as a packed model folder
  `out`, atomically; `overwrite` as `pack`'s. A model reading precomputed text embeddings
  needs them (`loaded.texts`) with the empty text's in them."""
  check_destination(out, MODEL_FOLDER, overwrite)
  needs_text = loaded.model.config.text is None
  if needs_text and loaded.texts is None:
    raise ModelError(f'{loaded.source}: the model reads precomputed text embeddings, and none '
                     "came with it: the packed model keeps the empty text's")
  tensors = {_key(p): np.ascontiguousarray(x)
             for stacked, v in nnx.to_flat_state(nnx.state(loaded.model))
             for p, x in mmdit.unstack(stacked, np.asarray(jax.device_get(v[...])))}
  meta = {'format': FORMAT, 'step': loaded.step, 'source': loaded.source,
          'config': loaded.config.to_dict(), 'model': config_json(loaded.model.config)}
  with atomic_dir(out, MODEL_FOLDER, overwrite) as tmp:
    save_file(tensors, str(tmp / WEIGHTS))
    if needs_text:
      key = TextEmbeddings.key('')
      states, pooled = loaded.texts([''])
      save_file({f'{key}.states': states[0], f'{key}.pooled': pooled[0]}, str(tmp / TEXT))
    (tmp / META).write_text(json.dumps(meta, indent=2) + '\n')
  return as_path(out)


def text_inputs(loaded: LoadedModel, embeddings=None) -> Callable[[list[str]], dict]:
  """A function texts -> the batch entries the model's text conditioning reads:
  `text_tokens` for the byte encoder; `text_embeds` and `pooled_text_embeds` for precomputed
  embeddings, looked up in `embeddings` (a safetensors file, as `TextEmbeddings`), then
  in those the model came with (a packed model: the empty text only)."""
  cfg = loaded.model.config
  if cfg.text is not None:
    return lambda texts: {'text_tokens': tokenize(texts, cfg.text.max_len)}
  tables = ([TextEmbeddings(embeddings)] if embeddings else []) + (
      [loaded.texts] if loaded.texts is not None else [])
  return embedding_lookup(tables, loaded.source, ModelError)


class JaxBackend:
  """`Decomposer`'s backend for a `LoadedModel`: the sampler and the decoder jitted, each
  compiled once per (shape, steps, guidance) and reused; run on `mesh` (the one the weights
  are placed on) when given. The noise of seed s is `jax.random.normal(PRNGKey(s))`."""

  def __init__(self, loaded: LoadedModel, *, mesh=None, embeddings=None):
    self.loaded = loaded
    self.source, self.step, self.config = loaded.source, loaded.step, loaded.config
    self.model = config_json(loaded.model.config)
    self.mesh = mesh
    self.text_inputs = text_inputs(loaded, embeddings)
    self._graphdef, self._state = nnx.split(loaded.model)
    self._board = 'checkerboard' in loaded.model.config.conditions
    self._sample = jax.jit(self._sample_fn, static_argnames=('steps', 'guidance'))
    self._decode = jax.jit(self._decode_fn)

  def _sample_fn(self, state, batch, uncond, noise, steps, guidance):
    model = nnx.merge(self._graphdef, state)
    return flow.sample_latents(model, batch, None, steps, self.config.loss.shift,
                               guidance=guidance, uncond=uncond if guidance != 1 else None,
                               noise=noise)

  def _decode_fn(self, state, latents, batch):
    model = nnx.merge(self._graphdef, state)
    board = batch['checkerboard'] if self._board else None
    return flow.decode_layers(model, latents, model.head_pixels(batch), board)

  def _on_mesh(self):
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def noise(self, seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32))

  def sample(self, batch: dict, uncond: dict | None, noise: np.ndarray, steps: int,
             guidance: float) -> jax.Array:
    with self._on_mesh():
      return jax.block_until_ready(self._sample(self._state, batch, uncond, noise,
                                                steps=steps, guidance=guidance))

  def decode(self, latents: jax.Array, batch: dict) -> dict[str, np.ndarray]:
    with self._on_mesh():
      out = jax.device_get(self._decode(self._state, latents, batch))
    return {k: np.asarray(v, np.float32) for k, v in out.items()}
