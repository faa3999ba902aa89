#!/usr/bin/env bash
# Builds the image and runs compose.yaml end to end (the `test` service: tests/stack_check.py, then
# pytest against the stack's Redis) with the shared container CI script, when this checkout has it.
# Exit code: the script's, or 0 with a skip line when it is absent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
ci=$root/../shared/tools/container-ci.sh
if [ ! -f "$ci" ]; then
  echo "container check skipped: $ci not found"
  exit 0
fi
cd "$root"
# The script bind-mounts a file:// package index's simple/ folder into RUN steps, but the index
# pages link to ../../files/ beside it, so pip fails on the first wheel it takes from there. Mount
# the index root instead. The edit is a no-op once the script changes that line; $0 stays the
# script's own path, so it still finds its stand-ins.
script=$(sed 's|^  \[ -d "\$d" \] && MOUNTS=|  case $d in */simple \| */simple/) d=${d%/}; d=${d%/simple};; esac\n&|' "$ci")
PROJECT_DIR=$PWD exec bash -c "$script" "$ci"
