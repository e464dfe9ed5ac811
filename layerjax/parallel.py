"""Device mesh `(data, fsdp, tensor)` and the logical-axis rules that place parameters on it.

Parameters carry logical axis names (`out_sharding` metadata, set in `layerjax.models.common`);
the rules below map each name to a mesh axis. A dimension that the mesh axis does not divide
is replicated rather than padded, so any config runs on any mesh shape.
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# logical name -> mesh axis (or axes); names not listed are replicated.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('channels', 'fsdp'),  # convolution / VAE feature channels
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('modulation', 'tensor'),
    ('joint', None),
    ('length', None),
    ('layers', None),  # the block axis of stacked MMDiT blocks: every device holds each block
)


def check_mesh_shape(shape: Sequence[int]) -> None:
  """One entry per axis of `MESH_AXES`, each >= 1 or -1 (the remaining devices), once."""
  shape = tuple(shape)
  if (len(shape) != len(MESH_AXES) or shape.count(-1) > 1
      or any(s != -1 and s < 1 for s in shape)):
    raise ValueError(f'mesh shape {shape} must give {len(MESH_AXES)} sizes {MESH_AXES}, each '
                     '>= 1 or -1 (the remaining devices) at most once')


def check_dcn_shape(dcn: Sequence[int]) -> None:
  """One entry per axis of `MESH_AXES`, each >= 1: how many slices the axis spans."""
  dcn = tuple(dcn)
  if len(dcn) != len(MESH_AXES) or any(s < 1 for s in dcn):
    raise ValueError(f'mesh_dcn {dcn} must give {len(MESH_AXES)} sizes {MESH_AXES}, each >= 1 '
                     '(the number of slices the axis spans)')


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """`shape` with its -1 replaced by the remaining devices; an error if they do not fit."""
  check_mesh_shape(shape)
  sizes = list(shape)
  rest = math.prod(s for s in sizes if s != -1)
  if -1 in sizes and num_devices % rest == 0:
    sizes[sizes.index(-1)] = num_devices // rest
  if math.prod(sizes) != num_devices:
    need = f'a multiple of {rest} devices' if -1 in sizes else f'{math.prod(sizes)} devices'
    raise ValueError(f'mesh shape {tuple(shape)} needs {need}, {num_devices} available')
  return tuple(sizes)


def fit_shape(shape: Sequence[int], num_devices: int, batch: int,
              dcn: Sequence[int] = (1, 1, 1)) -> tuple[int, ...]:
  """A mesh shape for `num_devices` that splits a global batch of `batch` examples.

  A shape with a fixed data size is only resolved (`resolve_shape`). With data -1, fsdp and
  tensor are the most the shape asks for (cut to their greatest common divisor with the
  devices there are), data takes as many of the remaining devices as keep data x fsdp (the
  batch axes) a divisor of `batch`, and any devices left over join the tensor axis: they
  split each example's work instead of the batch. Data stays a multiple of `dcn`'s data
  entry (data parallelism across slices). A batch that no data size divides is left to the
  caller's divisibility check, which names the fix.
  """
  check_mesh_shape(shape)
  if shape[0] != -1:
    return resolve_shape(shape, num_devices)
  fsdp = math.gcd(shape[1], num_devices)
  tensor = math.gcd(shape[2], num_devices // fsdp)
  rest = num_devices // (fsdp * tensor)
  fits = [d for d in range(rest, 0, -1)
          if rest % d == 0 and d % dcn[0] == 0 and batch % (d * fsdp) == 0]
  data = fits[0] if fits else rest
  return data, fsdp, tensor * rest // data


# TPU kinds whose slices need their physical axes split for most mesh shapes (as in
# `jax.make_mesh`).
_SPLIT_PHYSICAL_AXES = ('TPU v5 lite', 'TPU v5e')


def check_slices(shape: Sequence[int], devices: Sequence, dcn: Sequence[int]) -> int:
  """The number of slices of `devices`, which `dcn` (how many slices each axis of the mesh
  `shape` spans) must match and divide `shape` by; returns it."""
  check_dcn_shape(dcn)
  shape, dcn = tuple(shape), tuple(dcn)
  slices = len({getattr(d, 'slice_index', 0) for d in devices})
  if slices != math.prod(dcn):
    raise ValueError(f'the devices span {slices} slice(s) but mesh_dcn {dcn} asks for '
                     f'{math.prod(dcn)}: set mesh_dcn so that its product is {slices}, e.g. '
                     f'({slices}, 1, 1) (data parallel across slices)')
  if any(s % n for s, n in zip(shape, dcn)):
    raise ValueError(f'mesh_dcn {dcn}: each entry must divide the mesh shape {shape}')
  return slices


def multislice_grid(shape: Sequence[int], devices: Sequence, dcn: Sequence[int]) -> np.ndarray:
  """`devices` of several slices arranged as the mesh `shape` (no -1): each slice a block of
  shape `shape / dcn` in its interconnect's order, the blocks laid out as `dcn`
  (`mesh_utils.create_hybrid_device_mesh`)."""
  check_slices(shape, devices, dcn)
  ici = tuple(s // n for s, n in zip(shape, dcn))
  return mesh_utils.create_hybrid_device_mesh(
      ici, tuple(dcn), devices,
      allow_split_physical_axes=devices[0].device_kind in _SPLIT_PHYSICAL_AXES)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None,
              dcn: Sequence[int] = (1, 1, 1)) -> Mesh:
  """A mesh with axes (data, fsdp, tensor); use -1 once to take the remaining devices.

  On one slice `jax.make_mesh` orders the devices for the interconnect's topology; `dcn`
  gives how many slices (multislice: slices joined by the data-centre network) each axis
  spans (`multislice_grid`). Axes are `Auto`, as with a plain `Mesh`: XLA propagates the
  shardings.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_shape(shape, len(devices))
  auto = (AxisType.Auto,) * len(MESH_AXES)
  if check_slices(sizes, devices, dcn) == 1:
    return jax.make_mesh(sizes, MESH_AXES, axis_types=auto, devices=devices)
  return Mesh(multislice_grid(sizes, devices, dcn), MESH_AXES, axis_types=auto)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=DEFAULT_RULES) -> P:
  rules = dict(rules)
  spec, used = [], set()
  for name, dim in zip(axes, shape):
    target = rules.get(name) if name is not None else None
    names = (target,) if isinstance(target, str) else tuple(target or ())
    size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
    if not names or dim % size or used & set(names):
      spec.append(None)
      continue
    used |= set(names)
    spec.append(names[0] if len(names) == 1 else names)
  return P(*spec)


def model_shardings(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.State:
  """A state of `NamedSharding`s, one per variable, from its logical axis names."""
  def one(var: nnx.Variable):
    axes = var.get_metadata().get('out_sharding') or (None,) * var.ndim
    return NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh, rules))
  return jax.tree.map(one, nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
  """Places every variable of `model` on `mesh` according to `rules` (in place)."""
  state = nnx.state(model)
  shardings = model_shardings(model, mesh, rules)
  nnx.update(model, jax.device_put(state, shardings))
  return model


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
  """Leading (batch) axis split over the data-parallel mesh axes, the rest replicated."""
  return NamedSharding(mesh, P(dict(rules)['batch'], *([None] * (ndim - 1))))


def process_rows(mesh: Mesh, batch_size: int, process: int | None = None,
                 rules=DEFAULT_RULES) -> list[int]:
  """The rows of a global batch of `batch_size` that `process`'s devices hold (this process
  by default), ascending: what its loader yields, so that `global_batch` assembles the batch
  one process would see. Processes whose devices differ only along non-batch mesh axes hold
  (and so load) the same rows.

  Refused, naming the mesh: a batch the data-parallel axes do not divide, and a mesh whose
  processes hold different numbers of rows or rows that partly overlap, which
  `jax.make_array_from_process_local_data` cannot assemble.
  """
  axes = dict(rules)['batch']
  n = int(np.prod([mesh.shape[a] for a in axes]))
  if batch_size % n:
    raise ValueError(f'global batch {batch_size} is not divisible by the data-parallel size {n} '
                     f'of mesh {dict(mesh.shape)}')
  held: dict[int, set[int]] = {}
  for device, (index, *_) in batch_sharding(mesh, 1, rules).devices_indices_map(
      (batch_size,)).items():
    held.setdefault(device.process_index, set()).update(range(batch_size)[index])
  distinct = {frozenset(rows) for rows in held.values()}
  if len({len(rows) for rows in distinct}) > 1 or sum(map(len, distinct)) != batch_size:
    layout = {p: sorted(rows) for p, rows in sorted(held.items())}
    raise ValueError(f'mesh {dict(mesh.shape)}: its processes hold uneven or partly shared '
                     f'rows of the batch (process: rows {layout}); order the mesh devices so '
                     'that each process holds whole data-parallel slices (e.g. jax.make_mesh)')
  return sorted(held[jax.process_index() if process is None else process])


def process_shard(mesh: Mesh, batch_size: int, process: int | None = None,
                  rules=DEFAULT_RULES) -> tuple[int, int, bool]:
  """(shard, shards, first): `process`'s rows of a global batch (`process_rows`) as one of the
  batch's distinct row sets, numbered in row order, and whether it is the lowest-numbered
  process holding them. Processes whose devices differ only along non-batch axes share a
  shard: they read the same data, and one of them writes what the shard produces."""
  process = jax.process_index() if process is None else process
  held = {p: tuple(process_rows(mesh, batch_size, p, rules))
          for p in sorted({d.process_index for d in mesh.devices.flat})}
  shards = sorted(set(held.values()))
  mine = held[process]
  return shards.index(mine), len(shards), min(p for p, r in held.items() if r == mine) == process


def local_rows(x: jax.Array, mesh: Mesh, rules=DEFAULT_RULES) -> np.ndarray:
  """This process's rows (`process_rows`, ascending) of a global array whose leading axis is
  the batch, read from its own devices' shards however `x` is laid out: `global_batch`'s
  inverse. A row part of which only other processes hold is an error."""
  rows = process_rows(mesh, x.shape[0], rules=rules)
  if x.is_fully_addressable:
    return np.asarray(x)[rows]
  position = np.full(x.shape[0], -1)
  position[rows] = np.arange(len(rows))
  out = np.empty((len(rows),) + x.shape[1:], x.dtype)
  filled = np.zeros(out.shape, bool)
  for shard in x.addressable_shards:
    index = shard.index
    source = np.arange(x.shape[0])[index[0]]
    wanted = position[source] >= 0
    if wanted.any():
      target = (position[source[wanted]],) + tuple(index[1:])
      out[target] = np.asarray(shard.data)[wanted]
      filled[target] = True
  if not filled.all():
    raise ValueError(f'local_rows: an array {x.shape} laid out as {x.sharding} leaves part of '
                     f'this process\'s rows {rows} on other processes')
  return out


def process_allgather_json(value: Any) -> list:
  """`value` (anything `json` writes) from every process, in process order; [value] on one.
  Every process must call it (a collective)."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value).encode(), np.uint8).astype(np.int32)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.int32)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(rows[p, :n].astype(np.uint8).tobytes()) for p, n in enumerate(sizes)]


def constrain(x: jax.Array, axes: Sequence[str | None], rules=DEFAULT_RULES) -> jax.Array:
  """Pins an activation's sharding by logical axes under an active mesh; a no-op without one.

  Models call it at block boundaries so activations stay batch-sharded whatever XLA's
  partitioner would pick; run sharded models under `jax.set_mesh(mesh)`.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh, rules))


def global_batch(local: dict, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
  """This process's numpy batch -> global `jax.Array`s split over the batch mesh axes.

  Every process passes the rows its devices hold (`process_rows`, as the data loader yields
  them); processes that hold the same rows pass the same data. Non-numeric entries (texts)
  are left as they are.
  """
  out = {}
  for key, x in local.items():
    if isinstance(x, np.ndarray) and x.dtype != object:
      out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, rules), x)
    else:
      out[key] = x
  return out
