"""`layerjax.malloc`: the entry points restart once with glibc's huge-page tunable."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from layerjax import malloc

THP = Path('/sys/kernel/mm/transparent_hugepage/enabled')


def test_the_tunable_is_added_once_and_a_users_choice_kept():
  tuned = lambda env: malloc.tuned_environment(env, 'glibc')
  assert tuned({'HOME': '/h'}) == {'HOME': '/h', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  assert tuned({'GLIBC_TUNABLES': ''})['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
  assert tuned({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})['GLIBC_TUNABLES'] == (
      'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1')
  # Already there, either way: no restart, so no loop and a way to turn it off.
  assert tuned({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}) is None
  assert tuned({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0'}) is None
  # A longer name that starts the same is another tunable.
  assert tuned({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb_x=0'}) is not None
  assert malloc.tuned_environment({}, 'musl') is None
  assert malloc.tuned_environment({}, '') is None


# A large allocation, touched, and how much of this process's memory is on huge pages.
_CHILD = """
import json, os, sys
from layerjax import malloc
malloc.reexec()
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 256 << 20  # malloc maps it (numpy would madvise huge pages itself)
ctypes.memset(libc.malloc(size), 1, size)
huge = [l for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages:')]
print(json.dumps([os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], int(huge[0].split()[1]) >> 10]))
"""


def _child(env) -> list:
  """[GLIBC_TUNABLES, argv[1:], MiB on huge pages] of a child run of `_CHILD`."""
  return json.loads(subprocess.run([sys.executable, '-c', _CHILD, 'an', 'argument'], env=env,
                                   capture_output=True, text=True, check=True).stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc' or not THP.exists()
                    or '[madvise]' not in THP.read_text(),
                    reason="needs glibc and the kernel's THP mode 'madvise'")
def test_the_restarted_command_gets_huge_pages():
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  tunables, argv, mib = _child(env)
  assert tunables == 'glibc.malloc.hugetlb=1'
  assert argv == ['an', 'argument']  # the same command line
  assert mib >= 128  # most of the 256 MiB
  # Turned off by the user: the same allocation stays on 4 KiB pages.
  tunables, argv, mib = _child({**env, 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'})
  assert [tunables, argv, mib] == ['glibc.malloc.hugetlb=0', ['an', 'argument'], 0]
