"""Settings the host process reads only when it starts, set by re-executing the command once.

1. Transparent huge pages for the host allocator. XLA:CPU takes each execution's temporary
   buffer from `malloc`, which serves a request that large with a fresh `mmap` and returns it
   with `munmap`. A train step therefore faults its whole temporary memory in again, 4 KiB at
   a time: 694 MB and 170,000 page faults per step of `bench/mmdit_step.py`, about 0.3 of the
   two cores' time spent in the kernel (2-core Xeon, model 207). glibc's
   `glibc.malloc.hugetlb=1` makes those mappings transparent huge pages: about 1,000 faults
   per step, and the step 14% faster (1,452 against 1,250 ms, the mean of ten alternating
   runs each). PyTorch's step gains less (45,000 faults per step before). glibc reads
   `GLIBC_TUNABLES` only when a process starts, hence the restart; nothing happens where the
   C library is not glibc, and where the kernel's THP mode is `never` the tunable does
   nothing.
2. XLA:CPU's memory-aware order of a program's ops. By default XLA:CPU orders them to run
   independent ops at once (`xla_cpu_enable_concurrency_optimized_scheduler`) and gives each
   its own memory. Decoding an SD3-medium-shaped decomposer's layers (four VAE decoders at
   384x512) then took 2.6 GB of temporary memory, and its sampler 0.62 GB; in the
   memory-aware order 0.51 and 0.31 GB, and a 1024x768 photo's decomposition peaks at 3.1
   GiB instead of 5.0 (PyTorch's pipeline: 3.1); results are the same to the bit. The
   train step of `bench/mmdit_step.py`: 694 -> 671 MB, its time within this machine's noise
   (three alternating runs each). XLA reads the flag from `XLA_FLAGS` when JAX starts its
   CPU backend; a program's own `compiler_options` entry is parsed and then not applied
   (jax 0.10), hence here.

The entry points (`layerjax.main`, `layerjax.demo`, `layerjax.decompose`, the evaluation
and app commands, the benchmarks) call `reexec()` before anything else. A setting
the user made is left as it is: `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` (under a debugger,
say) or an `XLA_FLAGS` naming the scheduler flag. In a notebook, set both before the kernel
starts.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = 'glibc.malloc.hugetlb'
VALUE = '1'
XLA_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler'


def tuned_environment(environ: dict[str, str], libc: str) -> dict[str, str]:
  """`environ` with the settings above added where the user has not made them (the
  tunable only with glibc)."""
  env = dict(environ)
  current = env.get('GLIBC_TUNABLES', '')
  if libc == 'glibc' and not any(item.split('=', 1)[0] == TUNABLE
                                 for item in current.split(':')):
    env['GLIBC_TUNABLES'] = ':'.join(filter(None, (current, f'{TUNABLE}={VALUE}')))
  flags = env.get('XLA_FLAGS', '')
  if not any(f.split('=', 1)[0] == XLA_FLAG for f in flags.split()):
    env['XLA_FLAGS'] = ' '.join(filter(None, (flags, f'{XLA_FLAG}=false')))
  return env


def reexec() -> None:
  """Makes the settings of the module doc: restarts this command where `GLIBC_TUNABLES`
  needs them, sets `XLA_FLAGS` in place otherwise (JAX reads it when its backend starts);
  returns only where nothing needs a restart."""
  env = tuned_environment(dict(os.environ), platform.libc_ver()[0])
  if env.get('GLIBC_TUNABLES') != os.environ.get('GLIBC_TUNABLES'):
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
  os.environ.update(env)
