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
PROJECT_DIR=$root exec bash "$ci"
