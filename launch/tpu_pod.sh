#!/usr/bin/env bash
# Run layerjax.main on every worker of a Cloud TPU VM slice (pod), over `gcloud ... ssh
# --worker=all`. Each worker runs the same command with --distributed, so that
# jax.distributed.initialize() finds the slice from the TPU metadata. See launch/README.md.
set -euo pipefail

PROG=${0##*/}

usage() {
  cat <<EOF
Usage: $PROG --tpu NAME --zone ZONE [options] -- <args for layerjax.main>

Runs, on every worker of the TPU VM NAME (gcloud compute tpus tpu-vm ssh --worker=all):
    cd DIR && PYTHON -m layerjax.main --distributed <args>

Options:
  --tpu NAME        TPU VM (slice) name (required)
  --zone ZONE       its zone, e.g. us-east5-a (required)
  --project P       GCP project (default: gcloud's configured project)
  --repo-dir DIR    the checkout of this repository on every worker (default: ~/layerjax)
  --python PY       python on the workers (default: python3)
  --setup           first run 'PY -m pip install -e .[tpu]' in DIR on every worker;
                    with no args after --, only do that
  --dry-run         print the command(s), one per line, without running anything
  -h, --help        show this help

Example:
  $PROG --tpu my-v5p --zone us-east5-a -- \\
      --config=configs/liwi.py:sd3_medium --workdir=gs://bucket/run1
EOF
}

# shellcheck source=launch/lib.sh
source "${BASH_SOURCE[0]%/*}/lib.sh"

# Quotes a path for the remote shell, leaving a leading ~ or ~/ to be expanded there.
# shellcheck disable=SC2088  # the ~ is meant literally: the remote shell expands it
quote_path() {
  local rest
  case $1 in
    '~') printf '~' ;;
    '~/'*)
      rest=${1#"~/"}
      if [[ -z $rest ]]; then printf '~/'; else printf '~/%q' "$rest"; fi ;;
    *) printf '%q' "$1" ;;
  esac
}

# shellcheck disable=SC2088  # expanded by the remote shell
tpu='' zone='' project='' repo_dir='~/layerjax' python=python3 setup=0 dry_run=0
forwarded=()

while (($#)); do
  arg=$1
  case $arg in
    --) shift; forwarded=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --setup) setup=1; shift ;;
    --tpu|--tpu=*|--zone|--zone=*|--project|--project=*|--repo-dir|--repo-dir=*|--python|--python=*)
      need_value "$@"
      case ${arg%%=*} in
        --tpu) tpu=$value ;;
        --zone) zone=$value ;;
        --project) project=$value ;;
        --repo-dir) repo_dir=$value ;;
        --python) python=$value ;;
      esac
      shift "$nshift" ;;
    -*) die "unknown option: $arg" ;;
    *) die "unexpected argument '$arg' (arguments for layerjax.main go after --)" ;;
  esac
done

[[ -n $tpu ]] || die '--tpu NAME is required'
[[ -n $zone ]] || die '--zone ZONE is required'
((${#forwarded[@]} || setup)) || die 'nothing to run: put the arguments for layerjax.main after --'

ssh_cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone")
[[ -z $project ]] || ssh_cmd+=("--project=$project")
ssh_cmd+=(--worker=all)

remote_cd="cd $(quote_path "$repo_dir")"
remote_python=$(quote_path "$python")
commands=()  # each entry: the remote command string
if ((setup)); then
  commands+=("$remote_cd && $remote_python -m pip install -e '.[tpu]'")
fi
if ((${#forwarded[@]})); then
  printf -v remote_args ' %q' "${forwarded[@]}"
  commands+=("$remote_cd && $remote_python -m layerjax.main --distributed$remote_args")
fi

if ((dry_run)); then
  for c in "${commands[@]}"; do
    quote_line "${ssh_cmd[@]}" "--command=$c"
  done
  exit 0
fi

command -v gcloud >/dev/null 2>&1 ||
  die 'gcloud not found on PATH (install the Google Cloud SDK: https://cloud.google.com/sdk)'
for c in "${commands[@]}"; do
  "${ssh_cmd[@]}" "--command=$c"
done
