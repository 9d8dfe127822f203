#!/usr/bin/env bash
# Install everything, then run the embedded default: `cycleqd demo` (missing benchmark data
# fetched first, SmolLM2-135M experts, a CycleQD run and the comparison table). Extra
# arguments go to `cycleqd demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
# Benchmark data: this workplace's read-only copy beside the checkout, when there is one
# (elsewhere the code's default, <cache>/data, filled by `cycleqd data fetch`).
if [ -z "${CYCLEQD_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  CYCLEQD_DATA_DIR="$(cd ../shared/data && pwd)"
  export CYCLEQD_DATA_DIR
fi
CYCLEQD_WITH_MARIADB=0 bash scripts/install.sh
exec cycleqd demo "$@"
