"""The cache attacks of issue 12 (item 4), reproduced through the skills' public API only.

On the positional-id cache (``(fingerprint, skill key, "dbbench/0")``) each of these scored a
model with another data file's outcomes, without generating anything."""

from __future__ import annotations

import json

import pytest

from cycleqd.skills.cache import SampleCache

try:
    from .test_dbbench_common import ScriptedModel, final_answer, needs_sandbox
except ImportError:  # rootdir-relative import mode
    from test_dbbench_common import ScriptedModel, final_answer, needs_sandbox


def _db_record(label, description="How many medals were won?"):
    return {"description": description, "label": label, "type": ["counting"],
            "table": {"table_name": "medals",
                      "table_info": {"columns": [{"name": "Nation", "type": "TEXT"},
                                                 {"name": "Gold", "type": "TEXT"}],
                                     "rows": [["Finland", "3"], ["Sweden", "4"]]}}}


@needs_sandbox
def test_db_second_file_gets_no_outcome_of_the_first(tmp_path):
    """Two DB-Bench files whose first item has the same id ``dbbench/0`` and the same
    question, but another table state and gold answer. A model that always answers "7" is
    right on file A; on file B it is wrong -- and must be asked, not served A's 1.0."""
    from cycleqd.skills.agentbench.dbbench import DBBenchSkill

    a, b = tmp_path / "a" / "standard.jsonl", tmp_path / "b" / "standard.jsonl"
    a.parent.mkdir()
    b.parent.mkdir()
    a.write_text(json.dumps(_db_record(["7"])) + "\n")
    rec = _db_record(["5"])
    rec["table"]["table_info"]["rows"][1][1] = "2"
    b.write_text(json.dumps(rec) + "\n")
    cache = SampleCache(tmp_path / "c.sqlite")
    model = ScriptedModel(lambda conv: final_answer(["7"]), fingerprint="w-same-weights")

    ra = DBBenchSkill(data_path=a, split="all", cache=cache).evaluate(model)
    assert ra.quality == 1.0 and model.batches == [1]
    skb = DBBenchSkill(data_path=b, split="all", cache=cache)
    assert [it.id for it in skb.items] == ["dbbench/0"]       # same id, other item
    rb = skb.evaluate(model)
    assert model.batches == [1, 1], "file B was answered from file A's cache"
    assert rb.quality == 0.0, skb.last_details
    # and each file keeps its own outcome
    assert DBBenchSkill(data_path=a, split="all", cache=cache).evaluate(model).quality == 1.0
    assert model.batches == [1, 1]


@needs_sandbox
def test_os_folders_with_the_same_id_scheme_do_not_collide(tmp_path):
    """Two OS task folders, each with ``tasks.json``: both first tasks are ``os/tasks/0``.
    A model answering "alpha" passes folder A's task and fails folder B's."""
    from cycleqd.skills.agentbench.os_interaction import OSInteractionSkill

    paths = []
    for folder, answer in (("a", "alpha"), ("b", "beta")):
        p = tmp_path / folder / "tasks.json"
        p.parent.mkdir()
        p.write_text(json.dumps([{"description": "What is the secret word?",
                                  "evaluation": {"match": answer}}]))
        paths.append(p)
    cache = SampleCache(tmp_path / "c.sqlite")
    model = ScriptedModel(lambda conv: "Think: I know.\n\nAct: answer(alpha)", fingerprint="w-1")
    ska = OSInteractionSkill(data_path=paths[0], split="all", cache=cache)
    skb = OSInteractionSkill(data_path=paths[1], split="all", cache=cache)
    assert [it.id for it in ska.items] == [it.id for it in skb.items] == ["os/tasks/0"]
    assert ska.evaluate(model).quality == 1.0 and model.batches == [1]
    rb = skb.evaluate(model)
    assert model.batches == [1, 1], "folder B was answered from folder A's cache"
    assert rb.quality == 0.0


def test_lmeval_data_file_changed_under_the_same_task_config(tmp_path):
    """lm-eval: the task YAML names a data file; the file is rewritten (same path, same
    config): the documents are other items."""
    pytest.importorskip("lm_eval")
    from cycleqd.skills.lmeval import LMEvalSkill

    data = tmp_path / "qa.jsonl"
    (tmp_path / "t.yaml").write_text(
        f"task: cq_cache_attack\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\ndoc_to_text: \"Q: {{{{question}}}}\\nA:\"\n"
        "output_type: generate_until\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n")

    class Always4:
        fingerprint = "w-1"
        calls = 0

        def generate(self, conversations, *, max_new_tokens, stop=()):
            self.calls += 1
            return ["4" for _ in conversations]

    cache = SampleCache(tmp_path / "c.sqlite")
    data.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    model = Always4()
    sk = LMEvalSkill("cq_cache_attack", include_path=tmp_path, include_defaults=False, cache=cache)
    assert sk.evaluate(model).quality == 1.0 and model.calls == 1
    data.write_text(json.dumps({"question": "2+3?", "answer": "5"}) + "\n")
    sk2 = LMEvalSkill("cq_cache_attack", include_path=tmp_path, include_defaults=False, cache=cache)
    assert sk2.evaluate(model).quality == 0.0 and model.calls == 2
