"""Fixtures of the hostile-output suite: host canaries, a secret in the evaluator's
environment, a loopback TCP server that records connections, and leftover checks."""

from __future__ import annotations

import os
import secrets
import socket
import threading
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def host_guard(tmp_path_factory):
    """Things a sandbox must neither see nor touch."""
    d = tmp_path_factory.mktemp("cycleqd-canary")
    canary = d / "canary.txt"
    canary.write_text("intact")
    secret = "cq-secret-" + secrets.token_hex(8)
    os.environ["CYCLEQD_TEST_SECRET"] = secret  # the evaluator's (parent's) environment
    try:
        shadow = Path("/etc/shadow").read_text().splitlines()[0]
    except (OSError, IndexError):
        shadow = None
    guard = {"canary": canary, "secret": secret, "shadow": shadow,
             "outside": Path(f"/work/main/PWNED-{os.getpid()}"),
             "tmp_outside": Path(f"/tmp/PWNED-{os.getpid()}")}
    yield guard
    os.environ.pop("CYCLEQD_TEST_SECRET", None)
    for p in (guard["outside"], guard["tmp_outside"]):
        if p.exists():
            p.unlink()


class RecordingServer:
    """TCP server on 127.0.0.1 that sends a token to whoever connects and counts them."""

    def __init__(self) -> None:
        self.token = "cq-token-" + secrets.token_hex(8)
        self.connections = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self.t = threading.Thread(target=self._serve, daemon=True)
        self.t.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            try:
                c.sendall(self.token.encode() + b"\n")
            finally:
                c.close()

    def close(self) -> None:
        self._stop = True
        self.t.join(timeout=2)
        self.sock.close()


@pytest.fixture(scope="session")
def tcp_server():
    s = RecordingServer()
    # the server works from the host side (so a 0 count means "not reachable")
    with socket.create_connection(("127.0.0.1", s.port), timeout=2) as c:
        assert c.recv(64).decode().strip() == s.token
    s.connections = 0
    yield s
    s.close()
