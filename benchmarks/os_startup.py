"""OS episode start-up time with the OS machine image (issue 12: target median <= 0.5 s
per episode on 2 cores, the image built once and reused).

    PYTHONPATH=$PWD python benchmarks/os_startup.py [--n 40] [--workers 2] [--machine rootfs|host]

Prints, with the CPU model (``lscpu``):
- machine: start a machine (bwrap + overlay + user namespace + supervisor ping) and
  close it, one at a time -- median / p90 seconds;
- episode setup: a real OS task's full setup (machine, ``init`` scripts, the
  snapshot of the post-init machine, ``start``) and close, ``--workers`` at a
  time over the first ``--n`` training tasks -- median / p90 seconds per episode and
  wall seconds per episode (throughput).
The image build is not timed (it is reused; the first build is reported by
``python -m cycleqd.sandbox.rootfs``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])

from benchmarks._machine import describe, load  # noqa: E402
from cycleqd.sandbox import BwrapSession, sandbox_status  # noqa: E402
from cycleqd.sandbox.rootfs import default_rootfs  # noqa: E402
from cycleqd.skills.agentbench.data import load_os  # noqa: E402
from cycleqd.skills.agentbench.os_interaction import OS_LIMITS, OSEpisode  # noqa: E402


def _q(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--machine", default="rootfs", choices=["rootfs", "host"])
    a = p.parse_args()
    st = sandbox_status()
    if not st.available:
        sys.exit(f"no sandbox: {st.reason}")
    rootfs = default_rootfs(build=True) if a.machine == "rootfs" else None
    BwrapSession(OS_LIMITS, workdir="/", rootfs=rootfs).start().close()  # warm caches

    bare = []
    for _ in range(a.n):
        t = time.perf_counter()
        s = BwrapSession(OS_LIMITS, workdir="/", rootfs=rootfs).start()
        s.close()
        bare.append(time.perf_counter() - t)

    items = load_os(split="all", limit=a.n)
    per = []

    def one(it):
        t = time.perf_counter()
        ep = OSEpisode(it, limits=OS_LIMITS, command_timeout_s=10, setup_timeout_s=60,
                       rootfs=rootfs)
        try:
            ep.setup()
        finally:
            ep.close()
        per.append(time.perf_counter() - t)
        return ep.setup_failed

    t0 = time.perf_counter()
    with ThreadPoolExecutor(a.workers) as pool:
        failed = [f for f in pool.map(one, items) if f]
    wall = time.perf_counter() - t0
    print(f"machine: {rootfs if rootfs is not None else 'host-tree sandbox'}")
    print(f"cpu: {describe()}; {a.workers} workers; n={a.n}; {load()}")
    print(f"machine start+close: median {statistics.median(bare):.3f} s, p90 {_q(bare, .9):.3f} s")
    print(f"episode setup+close (init, snapshot for the reference, start): median {statistics.median(per):.3f} s, "
          f"p90 {_q(per, .9):.3f} s; wall {wall / len(items):.3f} s per episode; "
          f"{len(failed)} setups failed")


if __name__ == "__main__":
    main()
