#!/usr/bin/env bash
# Train with layerjax.main on a Slurm GPU cluster: one process per node that sees all the
# node's GPUs, started by srun with --distributed (jax.distributed.initialize() reads the
# SLURM_* variables), with the CPU cores and memory its config needs. Submits a generated
# batch script with sbatch, or with --now runs srun directly inside an existing allocation.
# See launch/README.md.
set -euo pipefail

PROG=${0##*/}

usage() {
  cat <<EOF
Usage: $PROG [options] -- <args for layerjax.main>

Submits with sbatch a batch script that runs
    srun --ntasks-per-node=1 --gpus-per-node=G PYTHON -m layerjax.main --distributed <args>
(PYTHON is \${PYTHON:-python}, resolved now; the job starts in the current directory).
One process per node: it drives all of the node's G GPUs, and its data loader runs the
config's data.num_workers processes next to it.

Options:
  --nodes N            nodes (default: 1; with --now: all nodes of the allocation)
  --gpus-per-node G    GPUs per node, all visible to the node's one process (default: 8)
  --cpus-per-task C    CPU cores for each node's process (default: from the config,
                       data.num_workers + 4; see layerjax.train.config.host_needs)
  --mem M              memory per node, e.g. 256G (default: from the config,
                       4G x data.num_workers + 64G)
  --partition P        partition (sbatch only)
  --time T             time limit, e.g. 24:00:00 or 2-00:00:00 (sbatch only)
  --job-name J         job name (default: layerjax; sbatch only)
  --sbatch-opt OPT     an extra '#SBATCH OPT' line, e.g. --sbatch-opt=--account=abc
                       (repeatable; sbatch only)
  --now                run srun directly, inside the current allocation (salloc; needs
                       SLURM_JOB_ID), instead of submitting a job
  --dry-run            print the command (the sbatch command with its script as a here-
                       document) without running anything
  -h, --help           show this help

Examples:
  $PROG --nodes 4 --gpus-per-node 8 --partition gpu --time 48:00:00 -- \\
      --config=configs/liwi.py:sd3_medium --workdir=/scratch/\$USER/run1
  salloc --nodes 2 --gpus-per-node 8 ...   # then, inside:
  $PROG --now --gpus-per-node 8 -- --config=configs/liwi.py:demo --workdir=out/demo
EOF
}

# shellcheck source=launch/lib.sh
source "${BASH_SOURCE[0]%/*}/lib.sh"

one_word() {  # one_word OPT VALUE: values that go on an #SBATCH line
  [[ $2 != *[[:space:]]* ]] || die "$1 must not contain whitespace, got '$2'"
}

nodes='' gpus=8 cpus='' mem='' partition='' time_limit='' job_name='' now=0 dry_run=0
sbatch_opts=() forwarded=()
while (($#)); do
  arg=$1
  case $arg in
    --) shift; forwarded=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --now) now=1; shift ;;
    --nodes|--nodes=*)
      need_value "$@"; positive_int --nodes "$value"; nodes=$value; shift "$nshift" ;;
    --gpus-per-node|--gpus-per-node=*)
      need_value "$@"; positive_int --gpus-per-node "$value"; gpus=$value; shift "$nshift" ;;
    --cpus-per-task|--cpus-per-task=*)
      need_value "$@"; positive_int --cpus-per-task "$value"; cpus=$value; shift "$nshift" ;;
    --mem|--mem=*)
      need_value "$@"
      [[ $value =~ ^[1-9][0-9]*[KMGT]?$ ]] || die "--mem must be a size like 256G, got '$value'"
      mem=$value; shift "$nshift" ;;
    --partition|--partition=*)
      need_value "$@"; one_word --partition "$value"; partition=$value; shift "$nshift" ;;
    --time|--time=*)
      need_value "$@"; one_word --time "$value"; time_limit=$value; shift "$nshift" ;;
    --job-name|--job-name=*)
      need_value "$@"; one_word --job-name "$value"; job_name=$value; shift "$nshift" ;;
    --sbatch-opt=*)
      # The value is itself an option (starts with -), so only the '=' form is unambiguous.
      value=${arg#*=}
      [[ $value == -* && $value != *$'\n'* ]] ||
        die "--sbatch-opt needs an sbatch option, e.g. --sbatch-opt=--account=abc"
      sbatch_opts+=("$value"); shift ;;
    --sbatch-opt)
      (($# >= 2)) && [[ $2 == -* && $2 != *$'\n'* ]] ||
        die "--sbatch-opt needs an sbatch option, e.g. --sbatch-opt=--account=abc"
      sbatch_opts+=("$2"); shift 2 ;;
    -*) die "unknown option: $arg" ;;
    *) die "unexpected argument '$arg' (arguments for layerjax.main go after --)" ;;
  esac
done

((${#forwarded[@]})) || die 'nothing to run: put the arguments for layerjax.main after --'
if ((now)); then
  [[ -n ${SLURM_JOB_ID:-} ]] ||
    die '--now runs inside a Slurm allocation, but SLURM_JOB_ID is not set (use salloc, or drop --now to submit with sbatch)'
  [[ -z $partition$time_limit$job_name && ${#sbatch_opts[@]} == 0 ]] ||
    die '--partition, --time, --job-name and --sbatch-opt only apply to sbatch submissions, not --now'
fi

python=${PYTHON:-python}
if [[ -z $cpus || -z $mem ]]; then
  # What the config needs of each node, read by the python that will run it.
  config_args=()
  for a in "${forwarded[@]}"; do
    case $a in --config=*|--config.*) config_args+=("$a") ;; esac
  done
  ((${#config_args[@]})) || die 'no --config=... after --: give --cpus-per-task and --mem'
  command -v "$python" >/dev/null 2>&1 ||
    die "python not found: '$python' (set PYTHON, or give --cpus-per-task and --mem)"
  needs=$("$python" -m layerjax.train.config "${config_args[@]}") ||
    die 'reading the config failed (the error is above)'
  read -r need_cpus need_mem <<<"$needs"
  cpus=${cpus:-$need_cpus} mem=${mem:-${need_mem}G}
fi

# jax.distributed.initialize() under Slurm would restrict each process to the one GPU
# numbered SLURM_LOCALID; listing the node's GPUs keeps all of them visible to its process.
device_ids=0
for ((i = 1; i < gpus; i++)); do device_ids+=",$i"; done

srun_cmd=(srun)
if ((now)) && [[ -n $nodes ]]; then srun_cmd+=("--nodes=$nodes"); fi
srun_cmd+=(--ntasks-per-node=1 "--gpus-per-node=$gpus" "--cpus-per-task=$cpus" "--mem=$mem")
srun_cmd+=("$python" -m layerjax.main --distributed "${forwarded[@]}")

if ((now)); then
  cmd=(env "JAX_LOCAL_DEVICE_IDS=$device_ids" "${srun_cmd[@]}")
  if ((dry_run)); then
    quote_line "${cmd[@]}"
    exit 0
  fi
  command -v srun >/dev/null 2>&1 || die 'srun not found on PATH'
  exec "${cmd[@]}"
fi

script="#!/bin/bash
#SBATCH --job-name=${job_name:-layerjax}
#SBATCH --nodes=${nodes:-1}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --cpus-per-task=$cpus
#SBATCH --mem=$mem"
[[ -z $partition ]] || script+=$'\n'"#SBATCH --partition=$partition"
[[ -z $time_limit ]] || script+=$'\n'"#SBATCH --time=$time_limit"
for opt in "${sbatch_opts[@]}"; do script+=$'\n'"#SBATCH $opt"; done
script+="
set -euo pipefail
# One process per node, seeing all of the node's GPUs (JAX would otherwise pick GPU SLURM_LOCALID).
export JAX_LOCAL_DEVICE_IDS=$device_ids
$(quote_line "${srun_cmd[@]}")"

if ((dry_run)); then
  printf "sbatch <<'LAYERJAX_SBATCH_EOF'\n%s\nLAYERJAX_SBATCH_EOF\n" "$script"
  exit 0
fi
command -v sbatch >/dev/null 2>&1 || die 'sbatch not found on PATH (run this on a Slurm login node)'
sbatch <<<"$script"
