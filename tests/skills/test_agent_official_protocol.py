"""The agent skills' ``protocol: official`` (issue 13 item 1): the official CycleQD id
lists, prompts, scorer, round and command limits, empty-answer judging and repeats,
checked with scripted agents (no model)."""

from __future__ import annotations

import json
import time

import pytest

from cycleqd.skills.agentbench import official
from cycleqd.skills.agentbench.data import OSItem, Script, load_dbbench_official, load_os_official
from cycleqd.skills.agentbench.dbbench import DBBenchSkill, parse_reply_official
from cycleqd.skills.agentbench.os_interaction import OSInteractionSkill
from cycleqd.skills.cache import SampleCache

try:
    from .test_dbbench_common import DATA, ScriptedModel, final_answer, needs_sandbox
except ImportError:  # rootdir-relative import mode (no __init__.py in tests/)
    from test_dbbench_common import DATA, ScriptedModel, final_answer, needs_sandbox

OFF = DATA / "cycleqd-official"
HAS_OFFICIAL = all((OFF / f).is_file() for f in ("dbbench_standard_dev.jsonl",
                                                 "os_search_samples.json", "search_ids.json"))
needs_official = pytest.mark.skipif(not HAS_OFFICIAL, reason=f"no official CycleQD data in {OFF}")


def _rows() -> list[dict]:
    return [json.loads(x) for x in (OFF / "dbbench_standard_dev.jsonl").read_text().splitlines() if x.strip()]


def _ids(key: str) -> list[int]:
    return json.loads((OFF / "search_ids.json").read_text())[key]


# ----------------------------------------------------------------------------- arguments

def test_protocol_arguments_are_checked():
    with pytest.raises(ValueError, match="protocol must be"):
        DBBenchSkill(protocol="paper")
    with pytest.raises(ValueError, match="scorer 'strict' is refused"):
        DBBenchSkill(protocol="official", scorer="strict")
    with pytest.raises(ValueError, match="split must be 'search'"):
        DBBenchSkill(protocol="official", split="test")
    with pytest.raises(ValueError, match="repeats applies to protocol 'official' only"):
        OSInteractionSkill(repeats=2)
    with pytest.raises(ValueError, match="repeats must be a positive int"):
        OSInteractionSkill(protocol="official", repeats=0)
    with pytest.raises(ValueError, match="protocol must be"):
        OSInteractionSkill(protocol="Official")


# ----------------------------------------------------------------------------- DB-Bench

@needs_official
def test_db_official_items_are_the_official_rows():
    items = load_dbbench_official()
    assert [it.id for it in items] == [f"dbbench/{i}" for i in _ids("agentbench_db")]
    assert len(items) == 341 and sum(int(it.id.split("/")[1]) >= 300 for it in items) == 60 - 6
    rows = _rows()
    for it in items:  # the official answer field: answer_md5 for modifications, else label
        ans = official.db_answer(rows[int(it.id.split("/")[1])])
        assert (it.answer_md5 in ans) if it.is_modification else (tuple(ans) == it.label)


def _gold_policy(by_id: dict, seen: list):
    """Runs a modification item's gold statement, then answers; answers a SELECT item's
    gold label. Records every conversation it is sent."""
    def policy(conv):
        seen.append(conv)
        it = by_id[conv[2]["content"]]
        if it.is_modification and len(conv) == 3:
            return f"Action: Operation\n```sql\n{it.label[0]}\n```"
        return final_answer(list(it.label)) if not it.is_modification else final_answer(["done"])
    return policy


@needs_official
def test_db_official_gold_scores_1_wrong_scores_0_and_prompt_is_the_official_one():
    sk = DBBenchSkill(protocol="official")
    assert sk.scorer == "agentbench-v0.2" and sk.max_rounds == official.DB_MAX_ROUND
    cats: dict[str, list] = {}
    for it in sk.items:
        cats.setdefault((it.category, int(it.id.split("/")[1]) >= 300), []).append(it)
    pick = [cats[("SELECT", False)][0], cats[("SELECT", True)][0], cats[("INSERT", False)][0],
            cats[("UPDATE", True)][0]]
    sk.items = pick
    rows = _rows()
    by_desc = {f"{it.description}\n{it.add_description}": it for it in pick}
    seen: list = []
    r = sk.evaluate(ScriptedModel(_gold_policy(by_desc, seen), "gold"))
    assert r.outcomes == {it.id: 1.0 for it in pick}, sk.last_details
    assert r.quality == 1.0
    firsts = {c[2]["content"]: c[:3] for c in seen}
    for it in pick:  # byte-identical to the official builder on the official row
        assert firsts[f"{it.description}\n{it.add_description}"] == \
            official.db_messages(rows[int(it.id.split("/")[1])])
    wrong = sk.evaluate(ScriptedModel(lambda c: final_answer(["-987654321"]), "wrong"))
    assert wrong.outcomes == {it.id: 0.0 for it in pick}
    # the exact (v0.2) comparison: a near number the project's tolerance accepts fails
    num = next(it for it in cats[("SELECT", False)]
               if len(it.label) == 1 and str(it.label[0]).replace(".", "", 1).isdigit())
    sk.items = [num]
    near = final_answer([float(num.label[0]) + 0.001])
    assert sk.evaluate(ScriptedModel(lambda c: near, "near")).quality == 0.0
    proj = DBBenchSkill(split="all")
    proj.items = [num]
    assert proj.evaluate(ScriptedModel(lambda c: near, "near")).quality == 1.0


@needs_official
def test_db_project_outcome_is_never_served_to_the_official_protocol(tmp_path):
    """The attack: outcomes cached under the project protocol, same weights, same item ids
    and content -- an official skill must score the items again."""
    cache = SampleCache(tmp_path / "c.sqlite")
    # the project settings closest to the official ones: only the protocol tells them apart
    proj = DBBenchSkill(split="all", cache=cache, scorer="agentbench-v0.2", max_rounds=5)
    off = DBBenchSkill(protocol="official", cache=cache)
    by_id = {it.id: it for it in proj.items}
    common = [it for it in off.items if by_id.get(it.id) == it and not it.is_modification][:3]
    assert len(common) == 3
    proj.items, off.items = list(common), list(common)
    by_desc = {f"{it.description}\n{it.add_description}": it for it in common}
    assert proj.evaluate(ScriptedModel(_gold_policy(by_desc, []), "same")).quality == 1.0
    wrong = ScriptedModel(lambda c: final_answer(["-987654321"]), "same")
    assert off.evaluate(wrong).quality == 0.0 and wrong.batches  # scored, not served
    assert proj.cache_key != off.cache_key
    # official outcomes are cached for official skills
    off2 = DBBenchSkill(protocol="official", cache=cache)
    off2.items = list(common)
    again = ScriptedModel(lambda c: final_answer(["1"]), "same")
    assert off2.evaluate(again).quality == 0.0 and not again.batches


def test_db_official_reply_parsing():
    """The official (AgentBench.old) patterns, exactly: ``Action: Operation\\n``, ````sql\\n``,
    ``\\nFinal Answer:``; anything else answers, "" at worst."""
    assert parse_reply_official("Action: Operation\n```sql\nSELECT\n1\n```", True) == ("operation", "SELECT 1")
    assert parse_reply_official("Action: Operation\n```sql\nSELECT 1\n```", False) == ("answer", "")
    assert parse_reply_official("Action: operation\n```sql\nSELECT 1\n```", True) == ("answer", "")
    assert parse_reply_official("Action: Operation\nSELECT 1", True) == ("answer", "")
    assert parse_reply_official("Action: Operation", True) == ("answer", "")  # no newline after
    assert parse_reply_official('Final Answer: ["a"]', True) == ("answer", "")  # no newline before
    assert parse_reply_official('ok\nAction: Answer\nFinal Answer: ["a"]', True) == ("answer", ' ["a"]')


@needs_official
def test_db_official_parsing_decides_the_outcome():
    """A gold answer written without the newline the official pattern needs scores 0 under
    the official protocol and 1 under the project's tolerant parser (same scorer)."""
    off = DBBenchSkill(protocol="official")
    item = next(it for it in off.items if not it.is_modification)
    off.items = [item]
    proj = DBBenchSkill(split="all", scorer="agentbench-v0.2")
    proj.items = [item]
    bare = "Final Answer: " + json.dumps(list(item.label))
    assert proj.evaluate(ScriptedModel(lambda c: bare, "bare")).quality == 1.0
    assert off.evaluate(ScriptedModel(lambda c: bare, "bare")).quality == 0.0
    assert off.last_details[item.id]["answer"] == ""
    six: list = []

    def operate(conv):  # always operates: 5 operations, then the 6th reply is the answer
        six.append(conv)
        return "Action: Operation\n```sql\nSELECT 1;\n```" if len(six) < 6 else \
            "Action: Answer\nFinal Answer: " + json.dumps(list(item.label))
    assert off.evaluate(ScriptedModel(operate, "ops")).quality == 1.0 and len(six) == 6


# ----------------------------------------------------------------------------- OS

@needs_official
def test_os_official_items_are_the_official_samples():
    items = load_os_official()
    assert [it.id for it in items] == [f"os-official/{i}" for i in _ids("agentbench_os")]
    samples = {s["index"]: s for s in json.loads((OFF / "os_search_samples.json").read_text())}
    assert sum(it.match is not None for it in items) == 12
    assert sum(it.start is not None for it in items) == 8
    for it in items:  # the stored 7-message problem is what the official builder makes
        assert official.os_problem(it.description) == samples[int(it.id.split("/")[1])]["problem"]


def _os_skill(**kw) -> OSInteractionSkill:
    sk = OSInteractionSkill(protocol="official", limit=1, episode_batch=4, **kw)
    if sk.rootfs is None:
        pytest.skip("no OS machine image (CYCLEQD_REQUIRE_ROOTFS=1 makes this an error)")
    return sk


def _desc(conv) -> str:
    return conv[6]["content"].split("My problem is:\n\n", 1)[1]


@needs_official
@needs_sandbox
def test_os_official_prompt_and_unanswered_episode_judged_with_empty_answer():
    sk = _os_skill(repeats=1)
    real = sk.items[0]
    empty_ok = OSItem("t/empty-ok", "Say nothing.", check=(
        Script("python", "import sys\nsys.exit(0 if sys.argv[1] == '' else 1)"),))
    empty_bad = OSItem("t/empty-bad", "Say x.", match={"answer": "x", "strip": True})
    no_action = OSItem("t/no-action", "Say nothing at all.", check=(
        Script("bash", 'test -z "$1"'),))
    sk.items = [real, empty_ok, empty_bad, no_action]
    seen: list = []

    def policy(conv):
        seen.append(conv)
        if _desc(conv) == no_action.description:
            return "I refuse to pick an action."
        return "Think: look.\n\nAct: bash\n\n```bash\necho hi\n```"
    r = sk.evaluate(ScriptedModel(policy, "idle"))
    assert r.outcomes[empty_ok.id] == 1.0 and r.outcomes[empty_bad.id] == 0.0, sk.last_details
    assert r.outcomes[no_action.id] == 1.0, sk.last_details
    assert sk.last_details[empty_ok.id]["end"] == "round limit"
    assert sk.last_details[no_action.id]["end"] == "no valid action"
    n_turns = sum(1 for c in seen if _desc(c) == empty_ok.description)
    assert n_turns == official.OS_MAX_ROUND
    samples = {s["index"]: s for s in json.loads((OFF / "os_search_samples.json").read_text())}
    first = next(c for c in seen if _desc(c) == real.description)
    assert first == samples[int(real.id.split("/")[1])]["problem"]  # the typo "I'will" too
    assert "I'will play" in first[0]["content"]
    # the project protocol does not judge an unanswered episode: 0
    proj = OSInteractionSkill(limit=1)
    proj.items = [empty_ok]
    assert proj.evaluate(ScriptedModel(policy, "idle")).quality == 0.0


@needs_official
@needs_sandbox
def test_os_official_quality_is_the_mean_of_repeats():
    sk = _os_skill()
    assert sk.repeats == official.OS_REPEATS == 5
    sk.items = [OSItem("t/answer", "Answer 42.", match={"answer": "42", "strip": True}),
                OSItem("t/other", "Answer 7.", init=(Script("bash", "echo 7 > /root/n"),),
                       match={"answer": "7", "strip": True})]
    calls: dict[str, int] = {}

    def policy(conv):  # right on repeats 2 and 4 of the first task, on every repeat of the second
        d = _desc(conv)
        calls[d] = calls.get(d, 0) + 1
        if d == "Answer 42.":
            return "Act: answer(42)" if calls[d] in (2, 4) else "Act: answer(41)"
        return "Act: answer(7)"
    model = ScriptedModel(policy, "stateful")
    r = sk.evaluate(model)
    assert r.outcomes == {"t/answer": 0.4, "t/other": 1.0}
    assert r.quality == pytest.approx(0.7)
    assert sk.last_details["t/answer"]["repeat_scores"] == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert model.batches == [2] * 5  # each repeat a fresh machine and one turn
    assert _os_skill(repeats=3).cache_key not in (sk.cache_key, OSInteractionSkill(limit=1).cache_key)


@needs_official
@needs_sandbox
def test_os_official_command_limit_is_5_seconds():
    sk = _os_skill(repeats=1)
    assert sk.command_timeout_s == official.OS_COMMAND_TIMEOUT_S == 5.0
    slow = OSItem("t/slow", "Wait.", match={"answer": "late", "strip": True})
    # a command over 5 s ends the episode; it is judged with "" (this check passes on "")
    slow_empty = OSItem("t/slow-empty", "Wait, then say nothing.",
                        check=(Script("bash", 'test -z "$1"'),))
    quick = OSItem("t/quick", "Wait a little.", match={"answer": "late", "strip": True})
    sk.items = [slow, slow_empty, quick]

    def policy(conv):
        if conv[-1]["content"].startswith("Now, I will start"):
            pause = 1 if _desc(conv) == quick.description else 4
            return f"Act: bash\n\n```bash\nsleep 3; echo early; sleep {pause}; echo late\n```"
        return "Act: answer(late)" if "late" in conv[-1]["content"] else "Act: answer(cut)"
    t = time.monotonic()
    model = ScriptedModel(policy, "slow")
    r = sk.evaluate(model)
    assert r.outcomes == {slow.id: 0.0, slow_empty.id: 1.0, quick.id: 1.0}, sk.last_details
    assert sk.last_details[slow.id]["end"] == "command timeout"
    assert len(sk.last_details[slow.id]["transcript"]) == 1  # no observation, no second turn
    assert time.monotonic() - t < 60
    sk.items = [slow]
    proj = OSInteractionSkill(limit=1)  # the project's 10 s: the command completes
    proj.items = sk.items
    assert proj.evaluate(ScriptedModel(policy, "slow")).quality == 1.0


@needs_official
@needs_sandbox
def test_os_official_finish_is_judged_with_none_as_the_official_code_does():
    """``finish`` commits the answer None; the official check chain passes ``str(None)``."""
    sk = _os_skill(repeats=1)
    sk.items = [OSItem("t/finish", "Finish.", check=(Script("bash", 'test "$1" = None'),)),
                OSItem("t/finish-empty", "Finish!", check=(Script("bash", 'test -z "$1"'),))]
    r = sk.evaluate(ScriptedModel(lambda c: "Think: done.\n\nAct: finish", "finish"))
    assert r.outcomes == {"t/finish": 1.0, "t/finish-empty": 0.0}, sk.last_details


@needs_official
@needs_sandbox
def test_os_project_outcome_is_never_served_to_the_official_protocol(tmp_path):
    cache = SampleCache(tmp_path / "c.sqlite")
    off = _os_skill(repeats=1, cache=cache)
    # the project settings closest to the official ones: only the protocol tells them apart
    proj = OSInteractionSkill(limit=1, cache=cache, command_timeout_s=5.0, max_rounds=5)
    item = OSItem("t/answer", "Answer 42.", match={"answer": "42", "strip": True})
    proj.items, off.items = [item], [item]
    assert proj.evaluate(ScriptedModel(lambda c: "Act: answer(42)", "same")).quality == 1.0
    wrong = ScriptedModel(lambda c: "Act: answer(41)", "same")
    assert off.evaluate(wrong).quality == 0.0 and wrong.batches  # scored, not served
