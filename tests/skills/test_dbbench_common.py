"""Helpers shared by the DB-Bench and OS skill tests (no tests here; named test_dbbench_*
so that it stays within the files owned by the DB/OS skills)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from cycleqd.sandbox import sandbox_status
from cycleqd.sandbox.sql import MariaDBConfig, mariadb_ping
from cycleqd.paths import data_dir as default_data_dir

DATA = default_data_dir()
HAS_DB_DATA = (DATA / "dbbench" / "standard.jsonl").is_file()
HAS_OS_DATA = (DATA / "os_interaction" / "training.json").is_file()
SANDBOX = sandbox_status()

needs_sandbox = pytest.mark.skipif(not SANDBOX.available, reason=f"no sandbox: {SANDBOX.reason}")
needs_db_data = pytest.mark.skipif(not HAS_DB_DATA, reason=f"no DB-Bench data in {DATA}")
needs_os_data = pytest.mark.skipif(not HAS_OS_DATA, reason=f"no OS data in {DATA}")


def mariadb_or_skip() -> MariaDBConfig:
    """The server of ``.ci/mariadb.sh``; skip (or fail with CYCLEQD_REQUIRE_MARIADB=1)."""
    cfg = MariaDBConfig.from_env()
    why = mariadb_ping(cfg)
    if why is not None:
        if os.environ.get("CYCLEQD_REQUIRE_MARIADB") == "1":
            pytest.fail(f"CYCLEQD_REQUIRE_MARIADB=1 but {why}")
        pytest.skip(f"{why} (run `source .ci/mariadb.sh`)")
    return cfg


class ScriptedModel:
    """A GenerationBackend stand-in whose replies come from ``policy(conversation)``;
    records every batch it is sent."""

    def __init__(self, policy, fingerprint: str = "scripted") -> None:
        self.policy = policy
        self.fingerprint = fingerprint
        self.batches: list[int] = []

    def generate(self, conversations, *, max_new_tokens: int, stop=()) -> list[str]:
        self.batches.append(len(conversations))
        return [self.policy(list(c)) for c in conversations]

    def load_weights(self, state_dict: Any, fingerprint: str) -> None:  # pragma: no cover
        self.fingerprint = fingerprint


def final_answer(values: list[Any]) -> str:
    return "Action: Answer\nFinal Answer: " + json.dumps(values)
