"""FLOPs a JAX function really does, counted from its jaxpr: every `dot_general` and
`conv_general_dilated` at the shapes it runs at, inside scans (times their length), jits,
custom-derivative and rematerialised calls, and the larger branch of a `cond`.

Why not XLA's `cost_analysis`: on GPUs it leaves out the matmuls XLA hands to cuBLAS and
cuDNN, and a hand formula per model drifts from the code. The jaxpr is what the model
computes: an MMDiT stream's projections appear at that stream's token count only, the
attention products at the joint length, a convolution at its own resolution.

Model FLOPs, as MFU counts them: trace the step with rematerialisation off, since a
`remat` call's recomputation would otherwise be counted (`count` includes it: it is what
runs). Elementwise work (norms, softmax, activations) is not counted; it is a few percent
of a transformer's FLOPs and none of its matmul-peak budget.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.extend import core as jcore


def _dot_flops(eqn) -> int:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  contract = math.prod(lhs[d] for d in lc)
  batch = math.prod(lhs[d] for d in lb)
  lhs_free = math.prod(s for d, s in enumerate(lhs) if d not in lc and d not in lb)
  rhs_free = math.prod(s for d, s in enumerate(rhs) if d not in rc and d not in rb)
  return 2 * batch * contract * lhs_free * rhs_free


def _conv_flops(eqn) -> int:
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  dn = eqn.params['dimension_numbers']
  # Each output element is a dot over kernel window x input channels per group: the
  # kernel's size over its output-feature dimension.
  out_features = rhs[dn.rhs_spec[0]]
  return 2 * math.prod(out) * (math.prod(rhs) // out_features)


def _sub_jaxprs(eqn) -> list[tuple[Any, int]]:
  """(jaxpr, multiplicity) of the calls inside `eqn`."""
  p = eqn.params
  name = eqn.primitive.name
  if name == 'scan':
    return [(p['jaxpr'], p['length'])]
  if name == 'cond':
    return [(max(p['branches'], key=lambda j: count_jaxpr(j.jaxpr)), 1)]
  if name == 'while':
    raise ValueError('a while loop has no static trip count; count its body per iteration')
  found = []
  for key in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    if key in p:
      found.append((p[key], 1))
  return found


def count_jaxpr(jaxpr) -> int:
  jaxpr = jaxpr.jaxpr if isinstance(jaxpr, jcore.ClosedJaxpr) else jaxpr
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      total += _dot_flops(eqn)
    elif name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    else:
      for sub, times in _sub_jaxprs(eqn):
        total += times * count_jaxpr(sub)
  return total


def count(fn: Callable, *args, **kwargs) -> int:
  """FLOPs of `fn(*args, **kwargs)` (arrays or `jax.ShapeDtypeStruct`s; nothing runs)."""
  return count_jaxpr(jax.make_jaxpr(fn)(*args, **kwargs))
