"""lm-evaluation-harness adapter on local custom tasks (a JSONL file made in the test)."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("lm_eval")

from cycleqd.skills.cache import SampleCache
from cycleqd.skills.lmeval import LMEvalSkill

DOCS = [{"question": "What is 2+2?", "answer": "4", "choices": ["3", "4", "5"], "label": 1},
        {"question": "Capital of France?", "answer": "Paris", "choices": ["Paris", "Rome"], "label": 0},
        {"question": "Color of the sky?", "answer": "blue", "choices": ["green", "blue"], "label": 1},
        {"question": "Opposite of hot?", "answer": "cold", "choices": ["cold", "warm"], "label": 0}]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmeval-tasks")
    data = d / "qa.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in DOCS))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
              "test_split: test\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n")
    (d / "gen.yaml").write_text(
        "task: cq_tiny_gen\n" + common + "output_type: generate_until\n"
        "doc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n    ignore_case: true\n")
    (d / "mc.yaml").write_text(
        "task: cq_tiny_mc\n" + common + "output_type: multiple_choice\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (d / "unsafe.yaml").write_text(
        "task: cq_tiny_unsafe\n" + common + "output_type: generate_until\nunsafe_code: true\n"
        "doc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return d


class TableBackend:
    """Answers questions from a table (some answers wrong)."""

    def __init__(self, answers, fingerprint="fp"):
        self.answers, self.fingerprint, self.seen = answers, fingerprint, []

    def generate(self, conversations, *, max_new_tokens, stop=()):
        out = []
        for conv in conversations:
            q = conv[-1]["content"].split("Question: ")[-1].split("\n")[0]
            self.seen.append((q, max_new_tokens, tuple(stop), len(conv)))
            out.append(self.answers.get(q, "no idea"))
        return out

    def load_weights(self, state_dict, fingerprint):
        self.fingerprint = fingerprint


def _skill(task_dir, task="cq_tiny_gen", **kw):
    return LMEvalSkill(task, include_path=task_dir, include_defaults=False, **kw)


def test_generate_task_scores_per_document(task_dir, tmp_path):
    right = {d["question"]: d["answer"] for d in DOCS}
    sk = _skill(task_dir, cache=SampleCache(tmp_path / "c.sqlite"))
    r = sk.evaluate(TableBackend(right))
    assert r.quality == 1.0 and set(r.outcomes) == {f"cq_tiny_gen/{i}" for i in range(4)}
    half = dict(right, **{"What is 2+2?": "5", "Opposite of hot?": "warm"})
    be = TableBackend(half, fingerprint="fp-half")
    r = sk.evaluate(be)
    assert r.quality == 0.5 and r.outcomes["cq_tiny_gen/0"] == 0.0 and r.outcomes["cq_tiny_gen/1"] == 1.0
    # the task's generation kwargs reach the backend
    assert be.seen[0][1:3] == (8, ("\n",))
    # cached: re-scoring the same weights sends nothing to the model
    n = len(be.seen)
    assert sk.evaluate(be) == r and len(be.seen) == n


def test_limit_and_chat_template(task_dir):
    be = TableBackend({"What is 2+2?": "4"})
    sk = _skill(task_dir, limit=2, apply_chat_template=True, system_instruction="Be brief.")
    r = sk.evaluate(be)
    assert set(r.outcomes) == {"cq_tiny_gen/0", "cq_tiny_gen/1"} and r.quality == 0.5
    assert all(n_msgs == 2 for *_, n_msgs in be.seen)  # system + user messages


def test_multiple_choice_with_hf_backend_matches_manual_loglikelihood(task_dir, tmp_path):
    import torch

    from cycleqd.inference import HFBackend
    from cycleqd.models.tiny import make_tiny_llama

    be = HFBackend.from_pretrained(make_tiny_llama(tmp_path / "m", seed=3, hidden_size=32,
                                                   num_layers=1), batch_size=4)
    r = _skill(task_dir, "cq_tiny_mc").evaluate(be)
    tok, model = be.tokenizer, be.model

    def logprob(ctx, cont):
        # lm-eval's HFLM: prefix the context with BOS/EOS-like prefix token when add_bos unset
        c_ids = tok(ctx, add_special_tokens=False)["input_ids"]
        t_ids = tok(cont, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([[tok.eos_token_id] + c_ids + t_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        start = 1 + len(c_ids)
        return sum(logp[start - 1 + i, t].item() for i, t in enumerate(t_ids))

    for i, d in enumerate(DOCS):
        ctx = f"Question: {d['question']}\nAnswer:"
        scores = [logprob(ctx, " " + c) for c in d["choices"]]
        expected = float(max(range(len(scores)), key=scores.__getitem__) == d["label"])
        assert r.outcomes[f"cq_tiny_mc/{i}"] == expected
    assert math.isclose(r.quality, sum(r.outcomes.values()) / 4)


def test_generation_only_backend_refused_for_loglikelihood_task(task_dir):
    with pytest.raises(ValueError, match="multiple_choice"):
        _skill(task_dir, "cq_tiny_mc").evaluate(TableBackend({}))


def test_bad_configuration_errors(task_dir):
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        _skill(task_dir, "no_such_task_anywhere")
    with pytest.raises(ValueError, match="metric 'bleu'"):
        _skill(task_dir, metric="bleu")
    with pytest.raises(ValueError, match="unsafe_code"):
        _skill(task_dir, "cq_tiny_unsafe")
    with pytest.raises(ValueError, match="limit"):
        _skill(task_dir, limit=0)
    with pytest.raises(ValueError, match="include_path"):
        LMEvalSkill("cq_tiny_gen", include_path=task_dir / "missing", include_defaults=False)


def test_inline_task_config(task_dir):
    cfg = {"task": "cq_inline", "dataset_path": "json",
           "dataset_kwargs": {"data_files": {"test": str(task_dir / "qa.jsonl")}},
           "test_split": "test", "output_type": "generate_until",
           "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{answer}}",
           "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4},
           "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                            "higher_is_better": True}]}
    sk = LMEvalSkill(cfg, include_defaults=False, name="inline")
    r = sk.evaluate(TableBackend({d["question"]: d["answer"] for d in DOCS[:3]}))
    assert sk.name == "inline" and r.quality == 0.75
