"""What every benchmark prints beside its figures: the CPU (``lscpu`` model and the flags that
decide kernel speed) and the load average.

Speed figures from different machines are not comparable (some CPUs here have AVX2 only,
others AVX-512 with native bf16 and AMX), and a figure taken at load 10 on 2 cores is not one
taken at load 0; so each benchmark prints :func:`describe` once and :func:`load` beside each
timed figure.

    from benchmarks._machine import cpu, describe, load
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess

#: ``lscpu`` flags that change CPU kernel speed (vector width, FMA, native bf16/int8 matmul)
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


@functools.lru_cache(maxsize=1)
def _lscpu() -> dict[str, str]:
    """``lscpu``'s "Key: value" lines ({} when lscpu is missing or fails)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines()) if v}


def cpu() -> str:
    """The CPU model (``lscpu``'s "Model name"; ``platform.processor()`` when lscpu is
    unavailable, "unknown" when neither says)."""
    return _lscpu().get("Model name") or platform.processor() or "unknown"


def flags() -> list[str]:
    """The :data:`SPEED_FLAGS` this CPU has, in that order."""
    have = set(_lscpu().get("Flags", "").split())
    return [f for f in SPEED_FLAGS if f in have]


def describe() -> str:
    """One line: model, logical CPU count and speed flags, e.g.
    ``Intel(R) Xeon(R) Processor, 2 cpus, flags avx2 fma avx512f avx512_bf16 amx_bf16``."""
    return f"{cpu()}, {os.cpu_count()} cpus, flags {' '.join(flags()) or 'none of ' + '/'.join(SPEED_FLAGS)}"


def load() -> str:
    """``uptime``'s load averages over 1, 5 and 15 minutes, e.g. ``load 0.52 0.40 0.31``."""
    try:
        return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load ?"
