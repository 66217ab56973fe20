#!/usr/bin/env bash
# The --help of every shell script of the project, in one place (not a command of its own).
# Usage: the first line after a script's header comment,
#   source "$(dirname "${BASH_SOURCE[0]}")/usage.sh"
# With -h or --help among its arguments the script then prints its header comment (its usage) and exits 0 before
# anything else runs: it installs, deletes, trains and writes nothing.
for _arg in "$@"; do
  if [[ "$_arg" == "-h" || "$_arg" == "--help" ]]; then
    # the comment lines after the shebang, up to the first line that is not a comment, without their "# "
    sed -n '2,/^[^#]/{/^#/{s/^# \{0,1\}//;p;};}' "${BASH_SOURCE[1]:-$0}"
    exit 0
  fi
done
unset _arg
