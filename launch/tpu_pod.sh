#!/usr/bin/env bash
# Run layerjax.main on every worker of a Cloud TPU VM slice, or of every slice of a queued
# resource (multislice), over `gcloud ... ssh --worker=all`: the same commit checked out on
# every worker, training detached from the ssh session with its log on each worker, and
# --stop / --logs for the run. See launch/README.md.
set -euo pipefail

PROG=${0##*/}

usage() {
  cat <<EOF
Usage: $PROG (--tpu NAME | --queued NAME) --zone ZONE [options] [-- <args for layerjax.main>]

Starts, on every worker (gcloud compute tpus tpu-vm ssh NAME --worker=all, or
gcloud compute tpus queued-resources ssh NAME --node=all --worker=all):
    cd DIR && git fetch origin && git checkout --detach COMMIT
    [gcloud storage rsync --recursive SRC DST ...]
    setsid nohup PYTHON -m layerjax.main --distributed <args> >> LOGS/layerjax.log &
and returns; the run goes on without the ssh session.

Target:
  --tpu NAME          a TPU VM slice (one slice)
  --queued NAME       a queued resource, one slice or several (multislice)
  --zone ZONE         its zone, e.g. us-east5-a (required)
  --project P         GCP project (default: gcloud's configured project)
Actions (one; the default is to start the run given after --):
  --setup             on every worker: clone the repository into DIR if absent, check out
                      COMMIT, install uv, create DIR/.venv with Python 3.11 (uv fetches it:
                      the images' python3 is 3.10) and 'uv pip install -e .[tpu,gcs]';
                      with args after --, then start the run
  --stop              stop the run on every worker: SIGTERM (it saves a checkpoint and
                      exits), SIGKILL to its process group after --grace seconds
  --logs              the last --lines lines of each worker's log, prefixed by its host
  --create            create the queued resource (with --queued, --accelerator-type,
                      --runtime-version; --slices for multislice, --spot)
Options:
  --repo-dir DIR      the checkout on every worker (default: ~/layerjax)
  --repo-url URL      where --setup clones from (default: this checkout's 'origin' URL)
  --commit C          the commit every worker runs (default: this checkout's HEAD; it
                      must be pushed, the workers fetch it from origin)
  --python PY         python on the workers, relative to DIR or absolute
                      (default: .venv/bin/python, what --setup makes)
  --sync SRC:DST      before starting, 'gcloud storage rsync --recursive SRC DST' on every
                      worker (DST relative to DIR), e.g. gs://b/weights/sd3:weights/sd3;
                      repeatable
  --log-dir L         the log and pid files on each worker (default: ~/layerjax-logs)
  --grace S           seconds --stop waits after SIGTERM (default: 300)
  --lines N           lines --logs shows per worker (default: 50)
  --slices N          slices of the queued resource (default: 1); with N > 1 the run gets
                      --config.mesh_dcn='(N, 1, 1)' (data parallel across slices) unless
                      the args set mesh_dcn
  --accelerator-type T, --runtime-version V, --spot   for --create
  --dry-run           print the command(s), one per line, without running anything
  -h, --help          show this help

Example:
  $PROG --tpu my-v5p --zone us-east5-a --setup --sync gs://b/weights:weights -- \\
      --config=configs/liwi.py:sd3_medium,embeddings=weights/emb.safetensors \\
      --workdir=gs://b/run1
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

set_action() {
  [[ $action == run || $action == "$1" ]] || die "--$1 and --$action cannot be combined"
  action=$1
}

# shellcheck disable=SC2088  # expanded by the remote shell
tpu='' queued='' zone='' project='' repo_dir='~/layerjax' repo_url='' commit=''
# shellcheck disable=SC2088
python=.venv/bin/python log_dir='~/layerjax-logs' grace=300 lines=50 slices=1
accelerator='' runtime='' spot=0 setup=0 action=run dry_run=0
syncs=() forwarded=()

while (($#)); do
  arg=$1
  case $arg in
    --) shift; forwarded=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --setup) setup=1; shift ;;
    --stop) set_action stop; shift ;;
    --logs) set_action logs; shift ;;
    --create) set_action create; shift ;;
    --spot) spot=1; shift ;;
    --tpu|--tpu=*|--queued|--queued=*|--zone|--zone=*|--project|--project=*|--repo-dir|\
    --repo-dir=*|--repo-url|--repo-url=*|--commit|--commit=*|--python|--python=*|--sync|\
    --sync=*|--log-dir|--log-dir=*|--grace|--grace=*|--lines|--lines=*|--slices|--slices=*|\
    --accelerator-type|--accelerator-type=*|--runtime-version|--runtime-version=*)
      need_value "$@"
      case ${arg%%=*} in
        --tpu) tpu=$value ;;
        --queued) queued=$value ;;
        --zone) zone=$value ;;
        --project) project=$value ;;
        --repo-dir) repo_dir=$value ;;
        --repo-url) repo_url=$value ;;
        --commit) commit=$value ;;
        --python) python=$value ;;
        --sync)
          [[ ${value%:*} == *://?* && -n ${value##*:} ]] ||
            die "--sync needs SRC:DST, e.g. gs://b/weights:weights, got '$value'"
          syncs+=("$value") ;;
        --log-dir) log_dir=$value ;;
        --grace) positive_int --grace "$value"; grace=$value ;;
        --lines) positive_int --lines "$value"; lines=$value ;;
        --slices) positive_int --slices "$value"; slices=$value ;;
        --accelerator-type) accelerator=$value ;;
        --runtime-version) runtime=$value ;;
      esac
      shift "$nshift" ;;
    -*) die "unknown option: $arg" ;;
    *) die "unexpected argument '$arg' (arguments for layerjax.main go after --)" ;;
  esac
done

[[ -n $tpu || -n $queued ]] || die '--tpu NAME or --queued NAME is required'
[[ -z $tpu || -z $queued ]] || die '--tpu and --queued name different targets: give one'
[[ -n $zone ]] || die '--zone ZONE is required'
((slices == 1)) || [[ -n $queued ]] ||
  die '--slices needs --queued (multislice runs on a queued resource)'
if [[ $action == create ]]; then
  [[ -n $queued ]] || die '--create makes a queued resource: give --queued NAME'
  [[ -n $accelerator && -n $runtime ]] ||
    die '--create needs --accelerator-type (e.g. v5p-128) and --runtime-version'
elif [[ $action == run ]]; then
  ((${#forwarded[@]} || setup)) ||
    die 'nothing to run: put the arguments for layerjax.main after --'
else
  ((${#forwarded[@]} == 0 && !setup)) || die "--$action takes no --setup and no args after --"
fi

target=(gcloud compute tpus)
if [[ -n $tpu ]]; then
  target+=(tpu-vm ssh "$tpu")
else
  target+=(queued-resources ssh "$queued")
fi
target+=("--zone=$zone")
[[ -z $project ]] || target+=("--project=$project")
[[ -z $queued ]] || target+=(--node=all)
target+=(--worker=all)

commands=()  # each entry: one full command (its words NUL-free), printed or run in order
add() { commands+=("$(quote_line "$@")"); }

logs=$(quote_path "$log_dir")
pidfile="$logs/layerjax.pid"
# shellcheck disable=SC2016  # expanded by the remote shell
host='"$(hostname)"'

if [[ $action == create ]]; then
  create=(gcloud compute tpus queued-resources create "$queued" "--zone=$zone")
  [[ -z $project ]] || create+=("--project=$project")
  create+=("--accelerator-type=$accelerator" "--runtime-version=$runtime")
  if ((slices > 1)); then
    create+=("--node-count=$slices" "--node-prefix=$queued")
  else
    create+=("--node-id=$queued")
  fi
  ((!spot)) || create+=(--spot)
  add "${create[@]}"
elif [[ $action == stop ]]; then
  add "${target[@]}" "--command=pid=\$(cat $pidfile 2>/dev/null) || { echo $host: no run; exit 0; }
if kill -TERM \"\$pid\" 2>/dev/null; then
  for _ in \$(seq $grace); do kill -0 \"\$pid\" 2>/dev/null || break; sleep 1; done
  if kill -0 \"\$pid\" 2>/dev/null; then how=\"killed after $grace s\"; else how=stopped; fi
  kill -KILL -- -\"\$pid\" 2>/dev/null || true  # what is left of its process group
  echo $host: \$how
else
  echo $host: no run
fi
rm -f $pidfile"
elif [[ $action == logs ]]; then
  add "${target[@]}" "--command=tail -n $lines $logs/layerjax.log | sed \"s/^/\$(hostname): /\""
else
  if [[ -z $commit ]]; then
    commit=$(git -C "${BASH_SOURCE[0]%/*}" rev-parse HEAD 2>/dev/null) ||
      die 'not in a git checkout: give the commit to run with --commit'
  fi
  repo=$(quote_path "$repo_dir")
  checkout="cd $repo && git fetch --quiet origin"
  checkout+=" && git checkout --quiet --detach $(printf %q "$commit")"
  if ((setup)); then
    if [[ -z $repo_url ]]; then
      repo_url=$(git -C "${BASH_SOURCE[0]%/*}" remote get-url origin 2>/dev/null) ||
        die "--setup clones the repository: give --repo-url (this checkout has no 'origin')"
    fi
    add "${target[@]}" "--command=set -e
export PATH=\"\$HOME/.local/bin:\$PATH\"
[ -d $repo/.git ] || git clone --quiet $(printf %q "$repo_url") $repo
$checkout
command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
uv venv --clear --python 3.11 .venv
uv pip install --python .venv/bin/python -e '.[tpu,gcs]'"
  fi
  if ((${#forwarded[@]})); then
    if ((slices > 1)) && [[ " ${forwarded[*]}" != *' --config.mesh_dcn'* ]]; then
      forwarded+=("--config.mesh_dcn=($slices, 1, 1)")
    fi
    printf -v main_args ' %q' "${forwarded[@]}"
    main="$(quote_path "$python") -m layerjax.main --distributed$main_args"
    sync=''
    for s in "${syncs[@]}"; do
      # Split at the last ':' (the one in gs:// comes first).
      sync+="gcloud storage rsync --recursive $(printf %q "${s%:*}") $(quote_path "${s##*:}")"$'\n'
    done
    add "${target[@]}" "--command=set -e
$checkout
${sync}mkdir -p $logs
if [ -e $pidfile ] && kill -0 \"\$(cat $pidfile)\" 2>/dev/null; then
  echo $host: a run is going \(pid \$(cat $pidfile)\): stop it first with --stop >&2; exit 1
fi
setsid nohup $main >> $logs/layerjax.log 2>&1 < /dev/null &
echo \$! > $pidfile
echo $host: started pid \$!, log $logs/layerjax.log"
  fi
fi

if ((dry_run)); then
  printf '%s\n' "${commands[@]}"
  exit 0
fi
command -v gcloud >/dev/null 2>&1 ||
  die 'gcloud not found on PATH (install the Google Cloud SDK: https://cloud.google.com/sdk)'
for c in "${commands[@]}"; do
  eval "$c"
done
