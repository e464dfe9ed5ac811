#!/usr/bin/env bash
# Run layerjax.main on this machine: one process, or N processes joined by
# jax.distributed (process 0 is the coordinator on localhost:PORT), e.g. to try multi-host
# sharding on a CPU with --cpu-devices. See launch/README.md.
set -euo pipefail

PROG=${0##*/}

usage() {
  cat <<EOF
Usage: $PROG [options] -- <args for layerjax.main>

With one process, runs  PYTHON -m layerjax.main <args>.  With N > 1, starts N processes
    PYTHON -m layerjax.main --coordinator_address=localhost:PORT --num_processes=N \\
        --process_id=I <args>          (I = 0 .. N-1)
in the background, waits for all of them and fails if any fails (stopping the others).
PYTHON is \${PYTHON:-python}.

Options:
  --processes N     processes (default: 1)
  --port P          coordinator port on localhost (default: 12355)
  --cpu-devices D   run on the CPU, as D devices per process: JAX_PLATFORMS=cpu and
                    XLA_FLAGS+=--xla_force_host_platform_device_count=D
  --dry-run         print the command(s), one per line, without running anything
  -h, --help        show this help

Examples:
  $PROG -- --config=configs/liwi.py:demo --workdir=out/demo
  $PROG --processes 2 --cpu-devices 4 -- --config=configs/liwi.py:demo --workdir=out/mh
EOF
}

# shellcheck source=launch/lib.sh
source "${BASH_SOURCE[0]%/*}/lib.sh"

processes=1 port=12355 cpu_devices='' dry_run=0
forwarded=()
while (($#)); do
  arg=$1
  case $arg in
    --) shift; forwarded=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --processes|--processes=*)
      need_value "$@"; positive_int --processes "$value"; processes=$value; shift "$nshift" ;;
    --port|--port=*)
      need_value "$@"; positive_int --port "$value"
      ((value <= 65535)) || die "--port must be at most 65535, got '$value'"
      port=$value; shift "$nshift" ;;
    --cpu-devices|--cpu-devices=*)
      need_value "$@"; positive_int --cpu-devices "$value"; cpu_devices=$value
      shift "$nshift" ;;
    -*) die "unknown option: $arg" ;;
    *) die "unexpected argument '$arg' (arguments for layerjax.main go after --)" ;;
  esac
done

((${#forwarded[@]})) || die 'nothing to run: put the arguments for layerjax.main after --'

python=${PYTHON:-python}
prefix=()
if [[ -n $cpu_devices ]]; then
  xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$cpu_devices"
  prefix=(env "XLA_FLAGS=$xla_flags" JAX_PLATFORMS=cpu)
fi

if ((processes == 1)); then
  cmd=("${prefix[@]}" "$python" -m layerjax.main "${forwarded[@]}")
  if ((dry_run)); then
    quote_line "${cmd[@]}"
    exit 0
  fi
  command -v "$python" >/dev/null 2>&1 || die "python not found: '$python' (set PYTHON)"
  exec "${cmd[@]}"
fi

process_cmd() {  # process_cmd I: sets cmd to process I's command
  cmd=("${prefix[@]}" "$python" -m layerjax.main "--coordinator_address=localhost:$port"
       "--num_processes=$processes" "--process_id=$1" "${forwarded[@]}")
}

if ((dry_run)); then
  for ((i = 0; i < processes; i++)); do
    process_cmd "$i"
    quote_line "${cmd[@]}"
  done
  exit 0
fi
command -v "$python" >/dev/null 2>&1 || die "python not found: '$python' (set PYTHON)"

# On exit, the processes still running get SIGTERM, then SIGKILL after $grace seconds or at
# a second Ctrl-C. (jax.distributed turns SIGTERM into a preemption notice: a healthy job may
# take a while to save a checkpoint and stop, and one whose peer died may not stop at all.)
grace=10
stop_all() {
  local pid t
  trap 'grace=0' INT
  for pid in $(jobs -pr); do kill -TERM "$pid" 2>/dev/null || true; done
  for ((t = 0; t < 10 * grace; t++)); do
    [[ -n $(jobs -pr) ]] || break
    sleep 0.1
  done
  for pid in $(jobs -pr); do kill -KILL "$pid" 2>/dev/null || true; done
  wait
}
trap stop_all EXIT
# Background processes ignore Ctrl-C; the EXIT trap stops them.
trap 'grace=60; exit 130' INT
trap 'grace=60; exit 143' TERM

for ((i = 0; i < processes; i++)); do
  process_cmd "$i"
  "${cmd[@]}" &
done

# A process that fails would leave the others waiting on it, so stop them all then.
for ((i = 0; i < processes; i++)); do
  status=0
  wait -n || status=$?
  if ((status != 0)); then
    printf '%s: a process exited with status %d; stopping the others\n' "$PROG" "$status" >&2
    exit "$status"
  fi
done
