#!/usr/bin/env bash
# Install everything, then run the embedded default: `cycleqd demo` (SmolLM2-135M experts,
# a CycleQD run and the comparison table). Extra arguments go to `cycleqd demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
CYCLEQD_WITH_MARIADB=0 bash scripts/install.sh
exec cycleqd demo "$@"
