#!/usr/bin/env bash
# Shared by the launchers (sourced): errors, quoting and option values.
# Each launcher sets PROG before sourcing this.

die() {
  printf '%s: error: %s\n' "$PROG" "$1" >&2
  printf "Try '%s --help'.\n" "$PROG" >&2
  exit 2
}

# Prints its arguments as one shell-quoted, copy-pasteable line.
quote_line() {
  local out='' arg q
  for arg in "$@"; do
    printf -v q '%q' "$arg"
    out+="${out:+ }$q"
  done
  printf '%s\n' "$out"
}

# need_value "$@": the value of the option in $1 ('--opt=value' or '--opt value') goes to
# $value, and the number of arguments it took to $nshift.
# shellcheck disable=SC2034  # value and nshift are read by the sourcing launcher
need_value() {
  local opt=$1
  if [[ $opt == *=* ]]; then
    value=${opt#*=} nshift=1 opt=${opt%%=*}
  elif (($# >= 2)) && [[ $2 != -* ]]; then
    value=$2 nshift=2
  else
    value=''
  fi
  [[ -n $value ]] || die "$opt needs a value"
}

positive_int() {  # positive_int OPT VALUE
  [[ $2 =~ ^[1-9][0-9]{0,5}$ ]] || die "$1 must be a positive integer, got '$2'"
}

