"""The official protocol's fixed settings cannot be overridden (issue 13 item 2), the official
LLAMA3 raw rendering of the agent skills (``chat_format: llama3-official``), and
``configs/paper.yaml`` = the official protocol for all three skills."""

from __future__ import annotations

from pathlib import Path

import pytest

from cycleqd.config import ConfigError, check_config, load_config
from cycleqd.skills.agentbench import official
from cycleqd.skills.agentbench.dbbench import DBBenchSkill
from cycleqd.skills.agentbench.dbbench import check_args as db_check
from cycleqd.skills.agentbench.os_interaction import OSInteractionSkill
from cycleqd.skills.agentbench.os_interaction import check_args as os_check
from cycleqd.skills.coding import official as code_official
from cycleqd.skills.coding.skill import check_args as code_check

try:
    from .test_dbbench_common import DATA, ScriptedModel, final_answer
except ImportError:  # rootdir-relative import mode
    from test_dbbench_common import DATA, ScriptedModel, final_answer

REPO = Path(__file__).resolve().parents[2]
PAPER = REPO / "configs" / "paper.yaml"
HAS_OFFICIAL = (DATA / "cycleqd-official" / "dbbench_standard_dev.jsonl").is_file()
needs_official = pytest.mark.skipif(not HAS_OFFICIAL, reason="no official CycleQD data")


# --------------------------------------------------------------- fixed parameters, per skill

@pytest.mark.parametrize("key,value", [("max_rounds", 3), ("max_new_tokens", 256), ("stop", ["\n"]),
                                       ("tolerance", 0.05)])
def test_db_official_refuses_another_value_of_a_fixed_parameter(key, value):
    with pytest.raises(ValueError, match=rf"^{key}: protocol 'official' "):
        db_check({"protocol": "official", key: value})
    db_check({"protocol": "project", key: value})  # the project protocol takes it


@pytest.mark.parametrize("key,value", [("max_rounds", 8), ("max_new_tokens", 128),
                                       ("command_timeout_s", 10), ("stop", ["x"]), ("one_shot", False)])
def test_os_official_refuses_another_value_of_a_fixed_parameter(key, value):
    with pytest.raises(ValueError, match=rf"^{key}: protocol 'official' fixes it at"):
        os_check({"protocol": "official", key: value})
    os_check({"protocol": "project", key: value})


def test_official_values_given_explicitly_are_accepted():
    db_check({"protocol": "official", "max_rounds": 5, "max_new_tokens": 512, "stop": [], "tolerance": 0.01})
    os_check({"protocol": "official", "max_rounds": 5, "max_new_tokens": 512, "command_timeout_s": 5,
              "stop": (), "one_shot": True, "repeats": 2})  # repeats: a documented override
    code_check("mbppplus", {"max_new_tokens": 512, "stop": list(code_official.STOP),
                            "system_prompt": code_official.SYSTEM_MESSAGE})


@pytest.mark.parametrize("key,value", [("max_new_tokens", 256), ("stop", ["```"]),
                                       ("system_prompt", "You are a coder.")])
def test_mbppplus_refuses_another_value_of_a_fixed_parameter(key, value):
    with pytest.raises(ValueError, match=rf"^{key}: protocol 'official' \(type mbppplus\) fixes it"):
        code_check("mbppplus", {key: value})
    code_check("mbpp", {key: value})  # the project's MBPP takes it


def test_constructors_refuse_too():
    with pytest.raises(ValueError, match="^command_timeout_s: protocol 'official'"):
        OSInteractionSkill(protocol="official", command_timeout_s=10.0)
    with pytest.raises(ValueError, match="^max_rounds: protocol 'official'"):
        DBBenchSkill(protocol="official", max_rounds=2)


def test_chat_format_argument():
    with pytest.raises(ValueError, match="chat_format must be one of"):
        db_check({"chat_format": "llama3"})
    with pytest.raises(ValueError, match="needs protocol 'official'"):
        os_check({"chat_format": "llama3-official"})
    assert official.check_chat_format({}, "project") == "model"


# --------------------------------------------------------------- the paper config

def _paper(**overrides):
    return load_config(PAPER, overrides)


def test_paper_config_is_the_official_protocol_for_all_three_skills():
    cfg = _paper()
    by = {s.name: s for s in cfg.skills}
    assert by["coding"].type == "mbppplus" and by["coding"].params == {}
    assert by["db"].params == {"protocol": "official", "backend": "mariadb", "chat_format": "llama3-official"}
    assert by["os"].params["protocol"] == "official" and by["os"].params["chat_format"] == "llama3-official"
    assert "repeats" not in by["os"].params  # the official 5
    assert [s.bc_range for s in cfg.skills] == [(0.0, 0.75), (0.0, 0.45), (0.0, 0.45)]
    assert all(s.bins == 15 for s in cfg.skills)
    assert cfg.qd.sampling == "elite_official" and cfg.qd.generations == 1200 and cfg.qd.flip_interval == 1
    assert cfg.qd.use_cma is False and cfg.qd.cma_popsize == 8 and cfg.qd.cma_sigma0 == 0.01
    assert cfg.operators.crossover.kwargs() == {"sigma": 0.01}
    assert cfg.operators.mutation.name == "svd_expert" and cfg.operators.mutation.kwargs() == {"rate": 0.1}
    assert cfg.seed == 42
    # the bundled copy is the same file
    assert (REPO / "cycleqd" / "configs" / "paper.yaml").read_text() == PAPER.read_text()


@pytest.mark.parametrize("key,value,field", [
    ("skills.db.params.max_rounds", 3, "skills.1.params.max_rounds"),
    ("skills.os.params.command_timeout_s", 10, "skills.2.params.command_timeout_s"),
    ("skills.coding.params.max_new_tokens", 256, "skills.0.params.max_new_tokens"),
    ("skills.db.params.scorer", "strict", "skills.1.params"),
])
def test_paper_config_override_of_a_fixed_setting_is_one_line_naming_the_field(key, value, field):
    cfg = _paper(**{key: value})
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(field), msg


def test_paper_config_header_lists_the_deviations():
    head = "".join(line for line in PAPER.read_text().splitlines(True) if line.startswith("#"))
    for needle in ("Deviations that remain", "32 table names", "Debian", "random_sampling",
                   "RNG streams", "second BOS", "llama3-official"):
        assert needle.lower() in head.lower(), needle


# --------------------------------------------------------------- the official LLAMA3 rendering

def test_render_for_sends_the_official_llama3_string():
    seen: list = []

    def gen(convs):
        seen.extend(convs)
        return ["x"] * len(convs)

    msgs = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "Ok."}]
    assert official.render_for("model", gen) is gen
    official.render_for("llama3-official", gen)([msgs])
    assert seen == [official.llama3_prompt(msgs)]
    assert seen[0].startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>")


class _Capture:
    """A backend stand-in recording exactly what each ``generate`` call receives."""

    fingerprint = "capture"

    def __init__(self) -> None:
        self.sent: list = []

    def generate(self, conversations, *, max_new_tokens, stop=()):
        self.sent.extend(conversations)
        return [final_answer(["1"]) for _ in conversations]


@needs_official
def test_db_llama3_official_episode_sends_the_raw_official_string_and_keys_apart():
    import json

    model = DBBenchSkill(protocol="official", limit=1, backend="sqlite")
    raw = DBBenchSkill(protocol="official", limit=1, backend="sqlite", chat_format="llama3-official")
    assert model.cache_key != raw.cache_key and "chat_format" not in repr(model.cache_key)
    cap = _Capture()
    raw.evaluate(cap)
    idx = int(raw.items[0].id.split("/")[1])
    row = json.loads((DATA / "cycleqd-official" / "dbbench_standard_dev.jsonl").read_text().splitlines()[idx])
    assert cap.sent == [official.llama3_prompt(official.db_messages(row))]
    cap2 = _Capture()
    model.evaluate(cap2)
    assert cap2.sent == [official.db_messages(row)]  # the default: chat messages


# --------------------------------------------------------------- the final stage (dry-run bug)

def test_paper_config_has_no_validation_split_so_the_final_stage_does_not_build_one(tmp_path):
    """The official protocol scores its official set only: the final model of a paper-config
    run is merged without validation scores (the CPU dry run died here, rebuilding MBPP+ on a
    'validation' split), and a strategy that chooses on validation is refused up front."""
    from cycleqd.engine.build import check_final, validation_skills

    cfg = _paper(**{"model.base": str(tmp_path), "model.experts.coding": str(tmp_path),
                    "model.experts.db": str(tmp_path), "model.experts.os": str(tmp_path)})
    assert validation_skills(cfg, tmp_path) is None
    check_final(cfg)  # the default (paper aggregation) does not choose: fine
    auto = _paper(**{"final.strategy": "auto"})
    with pytest.raises(ConfigError, match=r"^final.strategy: chooses on the validation split, but "
                                          r"skill\(s\) \['coding', 'db', 'os'\] have none$"):
        check_final(auto)
    # the project protocol keeps its validation split
    proj = _paper(**{"skills.coding.type": "mbpp", "skills.db.params.protocol": "project",
                     "skills.db.params.chat_format": "model", "skills.os.params.protocol": "project",
                     "skills.os.params.chat_format": "model"})
    assert validation_skills(proj, tmp_path) is not None
    check_final(proj.model_copy(update={"final": auto.final}))
