"""Issue 18 item 8: a local Ray cluster (tests, ``--workers N`` without ``--address``) binds and
connects on loopback only.

The executor is started in a fresh subprocess (so that it starts its own cluster, as the CLI
does), runs the seed evaluations on 2 workers, and then lists every inet socket of the
driver and all its descendants (GCS, raylet, dashboard, workers) with psutil: every local
and remote address must be 127.0.0.1 / ::1 (or the IPv4-mapped ::ffff:127.0.0.1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import ipaddress, json, sys
    import psutil
    from cycleqd.config import parse_config
    from cycleqd.engine.build import build_components
    from cycleqd.engine.loop import CycleQDRun
    from cycleqd.engine.step import Job
    from cycleqd.engine.workers import ray_step_executor
    from tests.conftest import tiny_config_dict

    tmp = sys.argv[1]
    cfg = parse_config(tiny_config_dict(tmp + "/cache"))
    run = CycleQDRun(cfg, build_components(cfg), tmp + "/run", progress=False)
    ex = ray_step_executor(run.ctx, workers=2, progress=False)  # as the CLI: dashboard included
    try:
        for sid in run.store.seeds:          # real traffic: jobs through both workers
            ex.submit(Job(0, 0, (), sid, 0))
        scores = [ex.next_result().scores for _ in run.store.seeds]

        def loopback(ip):
            a = ipaddress.ip_address(ip.split("%")[0])
            a = getattr(a, "ipv4_mapped", None) or a
            return a.is_loopback

        me = psutil.Process()
        procs = [me] + me.children(recursive=True)
        socks, bad, names = 0, [], set()
        for p in procs:
            try:
                conns = p.net_connections(kind="inet")
                name = p.name()
            except psutil.Error:
                continue
            for c in conns:
                socks += 1
                names.add(name)
                for addr in (c.laddr, c.raddr):
                    if addr and not loopback(addr.ip):
                        bad.append([name, c.status, str(c.laddr), str(c.raddr)])
        listen = sum(1 for p in procs for c in (p.net_connections(kind="inet") if p.is_running() else [])
                     if c.status == psutil.CONN_LISTEN)
        print("RESULT " + json.dumps({"procs": len(procs), "sockets": socks, "listen": listen,
                                      "bad": bad, "names": sorted(names), "scores": scores}))
    finally:
        ex.close()
""")


def test_local_cluster_sockets_are_all_loopback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(line[0][len("RESULT "):])
    assert res["bad"] == [], res["bad"][:20]
    # we really looked at a running cluster: its servers listen, its processes talk
    assert res["listen"] >= 3 and res["sockets"] >= 10 and "raylet" in res["names"]
    assert len(res["scores"]) == 3
