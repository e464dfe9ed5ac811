"""Transparent huge pages for the host allocator, set by re-executing the command once.

XLA:CPU takes each execution's temporary buffer from `malloc`, which serves a request that
large with a fresh `mmap` and returns it with `munmap`. A train step therefore faults its
whole temporary memory in again, 4 KiB at a time: 694 MB and 170,000 page faults per step
of `bench/mmdit_step.py`, about 0.3 of the two cores' time spent in the kernel (2-core Xeon,
model 207). glibc's `glibc.malloc.hugetlb=1` makes those mappings transparent huge pages:
about 1,000 faults per step, and the step 14% faster (1,452 against 1,250 ms, the mean of
ten alternating runs each). PyTorch's step gains less (45,000 faults per step before).

glibc reads `GLIBC_TUNABLES` only when a process starts, so the entry points
(`layerjax.main`, `layerjax.demo`, the benchmarks) call `reexec()` before anything else:
it restarts the same command line with the tunable added, once. A `GLIBC_TUNABLES` that
already names `glibc.malloc.hugetlb` is left as it is, so `GLIBC_TUNABLES=
glibc.malloc.hugetlb=0` turns this off (under a debugger, say). Nothing happens where the C
library is not glibc; where the kernel's THP mode is `never` the tunable has no effect.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = 'glibc.malloc.hugetlb'
VALUE = '1'


def tuned_environment(environ: dict[str, str], libc: str) -> dict[str, str] | None:
  """The environment to restart with, or None where `environ` needs no change (the tunable
  set either way by the user, or a C library other than glibc)."""
  if libc != 'glibc':
    return None
  current = environ.get('GLIBC_TUNABLES', '')
  if any(item.split('=', 1)[0] == TUNABLE for item in current.split(':')):
    return None
  return {**environ, 'GLIBC_TUNABLES': ':'.join(filter(None, (current, f'{TUNABLE}={VALUE}')))}


def reexec() -> None:
  """Restarts this command with `glibc.malloc.hugetlb=1`, if it is not set (see the module
  doc); returns only where nothing needs to change."""
  env = tuned_environment(dict(os.environ), platform.libc_ver()[0])
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
