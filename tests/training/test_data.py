"""Training data: prompts identical to the evaluators', replies the evaluators accept."""

from __future__ import annotations

import pytest

from cycleqd.training.data import build_conversations, coding_reply, mbpp_conversations


def test_mbpp_conversations_use_the_coding_prompt_and_pass_the_tests():
    from cycleqd.skills.coding.execute import build_program, run_program
    from cycleqd.skills.coding.extract import extract_code, sanitize_code
    from cycleqd.skills.coding.skill import CodingSkill

    convs = mbpp_conversations(limit=3)
    skill = CodingSkill("mbpp", split="train", limit=3)
    assert len(convs) == 3
    for conv, p in zip(convs, skill.problems):
        assert conv[:-1] == skill.conversation(p)          # exactly the evaluator's prompt
        reply = conv[-1]["content"]
        assert reply.startswith("```python\n") and reply.endswith("\n```")
        code = sanitize_code(extract_code(reply, p.entry_point), p.entry_point)
        assert run_program(build_program(p, code)).passed   # the evaluator would pass it


def test_never_trains_on_evaluation_splits():
    for split in ("search", "validation", "test"):
        with pytest.raises(ValueError, match="never trained on evaluation splits"):
            mbpp_conversations(split=split)
        with pytest.raises(ValueError, match="never trained on evaluation splits"):
            build_conversations("dbbench", split=split)
    with pytest.raises(ValueError, match="no training data builder"):
        build_conversations("humaneval")


def test_coding_reply_normalises_whitespace():
    assert coding_reply("\ndef f(): \n    return 1  \n\n") == "```python\ndef f():\n    return 1\n```"


def test_dbbench_trajectories_are_judged_correct(tmp_path):
    from cycleqd.skills.agentbench.dbbench import DB_PROMPT

    convs = build_conversations("dbbench", split="train", limit=12, cache_dir=tmp_path)
    assert len(convs) >= 6          # INSERT/UPDATE gold statements + reproducible SELECTs
    for c in convs:
        assert c[0] == {"role": "user", "content": DB_PROMPT} and c[1]["content"] == "Ok."
        assert c[3]["role"] == "assistant" and c[3]["content"].startswith("Action: Operation\n```sql\n")
        assert c[-1]["content"].startswith("Action: Answer\nFinal Answer: ")
    # cached: a second call reads the file
    assert build_conversations("dbbench", split="train", limit=12, cache_dir=tmp_path) == convs
    assert len(list((tmp_path / "trajectories").iterdir())) == 1


def test_os_trajectories_run_the_reference_in_the_sandbox(tmp_path):
    from cycleqd.sandbox import sandbox_status

    if not getattr(sandbox_status(), "available", True):
        pytest.skip("bubblewrap sandbox unavailable")
    convs = build_conversations("os", split="train", limit=6, one_shot=False, cache_dir=tmp_path)
    assert len(convs) >= 4
    for c in convs:
        assert c[1]["content"].startswith("Act: bash\n\n```bash\n")
        assert c[2]["content"].startswith("The output of the OS")   # a real observation
        assert c[3]["content"].startswith("Act: answer(")
