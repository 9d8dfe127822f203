#!/usr/bin/env bash
# Install everything, start the services the tests need (MariaDB), run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# Benchmark data: this workplace's read-only copy beside the checkout, when there is one
# (elsewhere the code's default, <cache>/data, filled by `cycleqd data fetch`).
if [ -z "${CYCLEQD_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  CYCLEQD_DATA_DIR="$(cd ../shared/data && pwd)"
  export CYCLEQD_DATA_DIR
fi
# The OS skill's Debian machine (built once, cached) needs root; without it those tests skip.
if [ "$(id -u)" = "0" ]; then export CYCLEQD_BUILD_ROOTFS="${CYCLEQD_BUILD_ROOTFS:-1}"; fi
bash scripts/install.sh
if [ -f .ci/mariadb.sh ]; then
  # shellcheck source=/dev/null
  source .ci/mariadb.sh
fi
exec python3 -m pytest -q -p no:cacheprovider "$@"
