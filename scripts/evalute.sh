#!/usr/bin/env bash
# The original project's spelling of scripts/evaluate.sh: runs exactly that script (same variables and arguments;
# --help prints its usage).
exec bash "$(dirname "$0")/evaluate.sh" "$@"
