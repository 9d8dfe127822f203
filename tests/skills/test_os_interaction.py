"""OS-interaction skill: protocol, checkers, reference commands pass, wrong answers fail."""

from __future__ import annotations

import pytest

from cycleqd.skills.agentbench.data import load_os, load_os_file, os_split_ids
from cycleqd.skills.agentbench.os_interaction import (OS_PROMPT, OSInteractionSkill, containing,
                                           extract_action, in_, integer_match, os_observation,
                                           size_match, string_match)

try:
    from .test_dbbench_common import ScriptedModel, needs_os_data, needs_sandbox
except ImportError:  # rootdir-relative import mode (no __init__.py in tests/)
    from test_dbbench_common import ScriptedModel, needs_os_data, needs_sandbox


def test_extract_action_follows_agentbench():
    a = extract_action("Think: x\n\nAct: bash\n\n```bash\nls\n```\n\n```bash\npwd\n```")
    assert a["action"] == "bash" and a["content"] == "ls\n\npwd"
    assert extract_action("Think: y\n\nAct: answer(42)")["content"] == "42"
    assert extract_action("Act: answer(f(x) = (1))")["content"] == "f(x) = (1)"
    assert extract_action("Act: finish") == {"thought": "", "action": "commit", "content": None}
    assert extract_action("no action here")["action"] is None
    # the last Act: wins
    assert extract_action("Act: bash\n```bash\nls\n```\nAct: answer(3)")["content"] == "3"


def test_observation_format():
    assert os_observation("") == "The output of the OS is empty."
    assert os_observation("hi\n") == "The output of the OS:\n\nhi\n"
    long = os_observation("x" * 900)
    assert long.endswith("\n[truncated because the output is too long]") and \
        long.count("x") == 780


def test_named_checkers():
    assert integer_match("3", "3\n") and not integer_match("three", "3\n")
    assert string_match(" ok\r\n", "ok\n") and not string_match("ok", "okay")
    assert size_match("4.0K", "4K") and size_match("4096", "4K") and size_match("1.5M", "1536K")
    assert not size_match("4K", "8K") and not size_match("", "")
    assert containing("the file is /root/a.txt", "/root/a.txt")
    assert in_("a.txt", "/root/a.txt\n") and not in_("b.txt", "/root/a.txt")


@needs_os_data
def test_os_splits_fixed_and_disjoint():
    items = load_os(split="all")
    assert len(items) == 1000
    sp = os_split_ids(items)
    print("os sizes:", {k: len(v) for k, v in sp.items()})
    assert [len(sp[k]) for k in ("search", "validation", "test", "train")] == [100, 100, 100, 700]
    names = list(sp)
    assert all(not set(sp[a]) & set(sp[b]) for a in names for b in names if a < b)
    assert set().union(*sp.values()) == {it.id for it in items}
    assert [it.id for it in load_os(split="test", limit=3)] == sp["test"][:3]
    with pytest.warns(UserWarning, match="left out"):
        dev = load_os(split="dev")
    assert len(dev) == 23  # 3 dev items need AgentBench script files not shipped here
    with pytest.raises(ValueError, match="split"):
        load_os(split="valid")


def _reference_policy(items):
    """Act on the reference (``example``) command, then answer its output."""
    by_desc = {it.description: it for it in items}

    def policy(conv):
        assert conv[0]["content"].startswith(OS_PROMPT)
        it = by_desc[conv[6]["content"].split("My problem is:\n\n", 1)[1]]
        if conv[-1]["content"].startswith("Now, I will start a new problem"):
            return f"Think: run it.\n\nAct: bash\n\n```bash\n{it.example.code}\n```"
        obs = conv[-1]["content"]
        out = obs.split("The output of the OS:\n\n", 1)[1].strip() if "\n\n" in obs else ""
        return f"Think: got it.\n\nAct: answer({out})"
    return policy


@needs_os_data
@needs_sandbox
def test_reference_commands_pass_and_wrong_answers_fail():
    sk = OSInteractionSkill(split="test", limit=24, episode_batch=12, workers=4)
    model = ScriptedModel(_reference_policy(sk.items))
    r = sk.evaluate(model)
    # a reference whose output spans lines cannot be written into one `Act: answer(...)`
    # line, and one whose output is empty is not an answer: leave those aside
    single_line = [i for i, d in sk.last_details.items()
                   if d.get("reference") is not None and len(d["reference"].strip().splitlines()) == 1]
    failed = {i: sk.last_details[i] for i in single_line if r.outcomes[i] != 1.0}
    assert len(single_line) >= 20 and not failed, failed
    assert model.batches[:2] == [12, 12] and len(model.batches) == 4  # lockstep, 2 chunks x 2

    wrong = ScriptedModel(lambda conv: "Think: guess.\n\nAct: answer(-123456789)", "wrong")
    assert sk.evaluate(wrong).quality == 0.0
    idle = ScriptedModel(lambda conv: "Think: hmm.\n\nAct: bash\n\n```bash\necho hi\n```", "idle")
    r3 = sk.evaluate(idle)
    assert r3.quality == 0.0 and len(idle.batches) == 2 * 5  # round limit: 5 replies


@needs_sandbox
def test_match_start_and_persistent_shell(tmp_path):
    """A `start` background process, `match` judging, state kept between turns."""
    import json

    task = {"description": "What does /root/log contain?",
            "create": {"init": {"code": "mkdir -p /root/d && echo hidden > /root/d/x"}},
            "start": "python3 -c 'import time\nwhile True:\n\topen(\"/root/log\",\"w\").write(\"succeed\")\n\ttime.sleep(0.2)' &",
            "evaluation": {"match": "succeed"}}
    check_task = {"description": "Create /root/out.txt containing 7, answer its size.",
                  "evaluation": {"check": [{"code": "test \"$(cat /root/out.txt)\" = 7 && echo ok"},
                                           {"language": "python", "file": "check/string-match.py"}],
                                 "example": "true"}}
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps([task, check_task]))
    items = load_os_file(path)
    sk = OSInteractionSkill(data_path=path, split="all")
    assert [it.id for it in sk.items] == [it.id for it in items]
    turns = {items[0].description: ["cd /root", "sleep 0.5; cat log", None],
             items[1].description: ["cd /root && echo 7 > out.txt", "cat out.txt", None]}

    def policy(conv):
        desc = conv[6]["content"].split("My problem is:\n\n", 1)[1]
        n = sum(1 for m in conv[7:] if m["role"] == "assistant")
        cmd = turns[desc][n]
        if cmd is None:
            ans = "succeed" if "log" in desc else "ok"
            return f"Act: answer({ans})"
        return f"Act: bash\n\n```bash\n{cmd}\n```"
    r = sk.evaluate(ScriptedModel(policy))
    assert r.outcomes == {items[0].id: 1.0, items[1].id: 1.0}, sk.last_details
    assert sk.last_details[items[0].id]["transcript"][3] == "The output of the OS:\n\nsucceed"


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="max_rounds"):
        OSInteractionSkill(max_rounds=0)
    with pytest.raises(ValueError, match="command_timeout_s"):
        OSInteractionSkill(command_timeout_s=0)
    with pytest.raises(FileNotFoundError, match="OS training.json"):
        OSInteractionSkill(data_path="/nonexistent")
