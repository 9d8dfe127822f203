"""Attacks on the OS-interaction grader (issue 12 item 3): each is a scripted agent that
must end as a failed sample (or, for the stderr case, a correct answer that must pass).
Every test failed on the grader before the fix (reference run after the agent, in the
agent's machine, with stdout+stderr and the answer as its argument; init failures
ignored; a named checker compared the answer with itself when nothing came before it)."""

from __future__ import annotations

import json
import os

import pytest

from cycleqd.sandbox import sandbox_status
from cycleqd.sandbox.rootfs import rootfs_status
from cycleqd.skills.agentbench.os_interaction import OSInteractionSkill

SANDBOX = sandbox_status()
ROOTFS_OK, ROOTFS_WHY = rootfs_status()
REQUIRE_ROOTFS = os.environ.get("CYCLEQD_REQUIRE_ROOTFS") == "1"

pytestmark = pytest.mark.skipif(not SANDBOX.available, reason=f"no sandbox: {SANDBOX.reason}")


def _machine(request) -> str:
    m = request.param
    if m == "rootfs" and not ROOTFS_OK:
        if REQUIRE_ROOTFS:
            pytest.fail(f"CYCLEQD_REQUIRE_ROOTFS=1 but no OS machine image: {ROOTFS_WHY}")
        pytest.skip(f"no OS machine image: {ROOTFS_WHY}")
    return m


@pytest.fixture(params=["host", "rootfs"])
def machine(request):
    return _machine(request)


class Agent:
    """A scripted agent: ``turns`` are bash commands, then ``answer``."""

    fingerprint = "attack"

    def __init__(self, turns, answer) -> None:
        self.turns, self.answer = list(turns), answer

    def generate(self, conversations, *, max_new_tokens, stop=()):
        out = []
        for conv in conversations:
            n = sum(1 for m in conv[7:] if m["role"] == "assistant")
            if n < len(self.turns):
                out.append(f"Think: x\n\nAct: bash\n\n```bash\n{self.turns[n]}\n```")
            else:
                out.append(f"Think: done\n\nAct: answer({self.answer})")
        return out


def _score(tmp_path, task: dict, agent: Agent, machine: str) -> tuple[float, dict]:
    path = tmp_path / "task.json"
    path.write_text(json.dumps([task]))
    sk = OSInteractionSkill(data_path=path, split="all", machine=machine, episode_batch=2,
                            workers=2)
    r = sk.evaluate(agent)
    (iid,) = r.outcomes
    return r.outcomes[iid], sk.last_details[iid]


COUNT_TASK = {
    "description": "How many files are in /root/d?",
    "create": {"init": {"code": "mkdir -p /root/d && for i in 1 2 3 4 5; do echo $i > /root/d/f$i; done"}},
    "evaluation": {"check": [None, {"language": "python", "file": "check/integer-match.py"}],
                   "example": {"code": "ls /root/d 2>/dev/null | wc -l"}},
}


def test_deleting_what_must_be_counted_does_not_pass(tmp_path, machine):
    s, d = _score(tmp_path, COUNT_TASK, Agent(["rm -rf /root/d"], "0"), machine)
    assert s == 0.0, d
    s, d = _score(tmp_path, COUNT_TASK, Agent(["ls /root/d | wc -l"], "5"), machine)
    assert s == 1.0, d  # the honest answer still passes


def test_planting_files_for_the_reference_does_not_pass(tmp_path, machine):
    s, d = _score(tmp_path, COUNT_TASK, Agent(["touch /root/d/x{1..95}"], "100"), machine)
    assert s == 0.0, d


def test_failed_init_fails_the_sample(tmp_path, machine):
    task = {"description": "How many files are in /root/stock?",
            "create": {"init": ["mkdir -p /root/stock", "echo 1 > /root/stock/a && exit 3"]},
            "evaluation": {"check": [None, {"language": "python", "file": "check/integer-match.py"}],
                           "example": {"code": "ls /root/nothing 2>/dev/null | wc -l"}}}
    s, d = _score(tmp_path, task, Agent([], "0"), machine)  # do-nothing agent
    assert s == 0.0 and "init[1] failed" in d.get("setup", ""), d


def test_reference_output_is_stdout_only(tmp_path, machine):
    task = {"description": "Answer 7.",
            "evaluation": {"check": [None, {"language": "python", "file": "check/integer-match.py"}],
                           "example": {"code": "echo 'warning: noise' >&2; echo 7"}}}
    s, d = _score(tmp_path, task, Agent([], "7"), machine)
    assert s == 1.0, d


def test_checker_with_nothing_before_it_fails(tmp_path, machine):
    task = {"description": "Anything.",
            "evaluation": {"check": [{"language": "python", "file": "check/integer-match.py"}]}}
    s, d = _score(tmp_path, task, Agent([], "12345"), machine)
    assert s == 0.0, d


def test_reference_is_not_given_the_answer(tmp_path, machine):
    """A null (reference) entry first: the reference must not see the answer, so an
    example that echoes its argument does not make every answer right."""
    task = {"description": "Say something.",
            "evaluation": {"check": [None, {"language": "python", "file": "check/string-match.py"}],
                           "example": {"code": "echo \"$1\""}}}
    s, d = _score(tmp_path, task, Agent([], "anything at all"), machine)
    assert s == 0.0, d


@pytest.mark.parametrize("machine", ["rootfs"], indirect=True)
def test_reference_side_effects_stay_out_of_the_agents_machine(tmp_path, machine):
    task = {"description": "What is in /root/leak?",
            "evaluation": {"check": [None, {"language": "python", "file": "check/string-match.py"}],
                           "example": {"code": "echo 42 > /root/leak; cat /root/leak"}}}
    s, d = _score(tmp_path, task, Agent(["cat /root/leak 2>/dev/null || echo none"], "none"),
                  machine)
    assert s == 0.0 and "none" in d["transcript"][1], d


@pytest.mark.parametrize("machine", ["rootfs"], indirect=True)
def test_processes_left_by_init_count_and_killing_them_does_not_pass(tmp_path, machine):
    """A snapshot holds files, not processes: when init leaves processes running the
    reference runs in the agent's machine right after init, before the agent."""
    task = {"description": "How many processes does user u run?",
            "create": {"init": "useradd u; for i in 1 2 3; do sudo -u u sleep 1000 & done"},
            "evaluation": {"check": [None, {"language": "python", "file": "check/integer-match.py"}],
                           "example": {"code": "ps -u u --no-headers | wc -l"}}}
    s, d = _score(tmp_path, task, Agent(["ps -u u --no-headers | wc -l"], "3"), machine)
    assert s == 1.0, d
    s, d = _score(tmp_path, task, Agent(["pkill -u u; sleep 0.2"], "0"), machine)
    assert s == 0.0, d
