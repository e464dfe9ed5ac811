"""`layerjax.host`: the entry points restart once with glibc's huge-page tunable and
XLA:CPU's memory-aware scheduler."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from layerjax import host

THP = Path('/sys/kernel/mm/transparent_hugepage/enabled')
FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler'


def test_the_tunable_is_added_once_and_a_users_choice_kept():
  tuned = lambda env: host.tuned_environment(env, 'glibc')['GLIBC_TUNABLES']
  assert tuned({'HOME': '/h'}) == 'glibc.malloc.hugetlb=1'
  assert tuned({'GLIBC_TUNABLES': ''}) == 'glibc.malloc.hugetlb=1'
  assert tuned({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}) == (
      'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1')
  # Already there, either way: unchanged, so no restart loop and a way to turn it off.
  assert tuned({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}) == 'glibc.malloc.hugetlb=1'
  off = 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0'
  assert tuned({'GLIBC_TUNABLES': off}) == off
  # A longer name that starts the same is another tunable.
  assert tuned({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb_x=0'}) == (
      'glibc.malloc.hugetlb_x=0:glibc.malloc.hugetlb=1')
  for libc in ('musl', ''):
    assert 'GLIBC_TUNABLES' not in host.tuned_environment({}, libc)


def test_the_xla_flag_is_added_once_and_a_users_choice_kept():
  flags = lambda env, libc='glibc': host.tuned_environment(env, libc)['XLA_FLAGS']
  assert flags({'HOME': '/h'}) == f'{FLAG}=false'
  assert flags({}, 'musl') == f'{FLAG}=false'  # XLA's, whatever the C library
  assert flags({'XLA_FLAGS': '--xla_dump_to=/d'}) == f'--xla_dump_to=/d {FLAG}=false'
  assert flags({'XLA_FLAGS': f'{FLAG}=true'}) == f'{FLAG}=true'
  assert flags({'XLA_FLAGS': f'--a=1 {FLAG}=false'}) == f'--a=1 {FLAG}=false'
  assert flags({'XLA_FLAGS': f'{FLAG}_x=1'}) == f'{FLAG}_x=1 {FLAG}=false'


# Restarted as the entry points do: the flags it runs with, a large allocation touched and
# how much of this process's memory is on huge pages, and the temporary memory XLA gives a
# program of two independent chains of 256x256 float32 matmuls (256 KiB per intermediate).
_CHILD = """
import json, os, sys
from layerjax import host
host.reexec()
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 256 << 20  # malloc maps it (numpy would madvise huge pages itself)
ctypes.memset(libc.malloc(size), 1, size)
huge = [l for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages:')]
import jax, jax.numpy as jnp
def chain(x, w):
  for _ in range(6):
    x = x + jnp.tanh(x @ w)
  return x
x = jax.ShapeDtypeStruct((256, 256), jnp.float32)
temp = jax.jit(lambda a, b, w: (chain(a, w), chain(b, w))).lower(x, x, x).compile()
print(json.dumps([os.environ.get('GLIBC_TUNABLES'), os.environ.get('XLA_FLAGS'), sys.argv[1:],
                  int(huge[0].split()[1]) >> 10,
                  temp.memory_analysis().temp_size_in_bytes >> 10]))
"""


def _child(env) -> list:
  """[GLIBC_TUNABLES, XLA_FLAGS, argv[1:], MiB on huge pages, KiB of XLA's temporary
  memory] of a child run of `_CHILD`."""
  return json.loads(subprocess.run([sys.executable, '-c', _CHILD, 'an', 'argument'], env=env,
                                   capture_output=True, text=True, check=True).stdout)


def _env(**kw) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'XLA_FLAGS')}
  return {**env, 'JAX_PLATFORMS': 'cpu', **kw}


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc' or not THP.exists()
                    or '[madvise]' not in THP.read_text(),
                    reason="needs glibc and the kernel's THP mode 'madvise'")
def test_the_restarted_command_gets_huge_pages():
  tunables, _, argv, mib, _ = _child(_env())
  assert tunables == 'glibc.malloc.hugetlb=1'
  assert argv == ['an', 'argument']  # the same command line
  assert mib >= 128  # most of the 256 MiB
  # Turned off by the user: the same allocation stays on 4 KiB pages.
  tunables, _, argv, mib, _ = _child(_env(GLIBC_TUNABLES='glibc.malloc.hugetlb=0'))
  assert [tunables, argv, mib] == ['glibc.malloc.hugetlb=0', ['an', 'argument'], 0]


def test_the_command_runs_one_chain_at_a_time_in_its_memory():
  # Memory-aware: one chain's intermediate at a time, 256 KiB.
  _, flags, _, _, kib = _child(_env())
  assert (flags, kib) == (f'{FLAG}=false', 256)
  # The user's own choice: XLA's default order runs the two chains at once, each with its
  # own intermediate.
  _, flags, _, _, kib = _child(_env(XLA_FLAGS=f'{FLAG}=true'))
  assert (flags, kib) == (f'{FLAG}=true', 512)
