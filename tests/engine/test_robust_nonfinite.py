"""Issue 18 item 3: non-finite weights and scores never enter an archive.

Each test is an attack that passed silently (or killed the run) on the old code: a child whose
weights hold NaN was scored 0.0 and inserted; a skill returning NaN killed the run with a
ValueError; a NaN quality poisoned the cell, the QD score and the sampling probabilities.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from cycleqd.engine.build import build_components
from cycleqd.engine.loop import Components, run_cycleqd
from cycleqd.engine.rundir import RunDir
from cycleqd.skills.base import SkillResult


class PoisonSpace:
    """Wraps a weight space; the weights of child ``bad_child`` get ``value`` in one entry."""

    def __init__(self, inner, value: float, bad_generation: int):
        self.inner, self.value, self.bad_generation = inner, value, bad_generation
        self._n = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def crossover(self, parents, generator):
        self._n += 1
        return self.inner.crossover(parents, generator)

    def materialize(self, genome):
        w = self.inner.materialize(genome)
        if getattr(genome, "_poison", False):
            k = next(k for k, t in w.items() if t.ndim == 2)
            w[k] = w[k].clone()
            w[k].view(-1)[3] = self.value
        return w

    def mutate(self, genome, skill, generator):
        child = self.inner.mutate(genome, skill, generator)
        if self._n == self.bad_generation:
            child = _Poisoned(child)
        return child

    def save(self, genome, path):
        return self.inner.save(genome.inner if isinstance(genome, _Poisoned) else genome, path)


class _Poisoned(dict):
    """A dense genome marked for poisoning (a dict subclass, so dense spaces accept it)."""

    _poison = True

    def __init__(self, inner):
        super().__init__(inner)
        self.inner = inner


class NaNOnce:
    """A skill that returns NaN for the weights of one generation (duck-typed result or a
    SkillResult, which refuses NaN)."""

    def __init__(self, inner, bad_call: int, duck: bool):
        self.inner, self.name, self.bad_call, self.duck, self.calls = inner, inner.name, bad_call, duck, 0

    def evaluate(self, model):
        self.calls += 1
        if self.calls == self.bad_call:
            if self.duck:
                class R:
                    quality, outcomes, subscores = math.nan, {}, {}
                return R()
            return SkillResult(math.nan)
        return self.inner.evaluate(model)


def _all_elites_finite(run_dir):
    state = json.loads((run_dir / "state.json").read_text())
    for a in state["archives"]:
        for e in a["elites"]:
            assert math.isfinite(e["quality"]), e
            assert all(math.isfinite(v) for v in e["scores"].values()), e
    return state


@pytest.mark.parametrize("value", [math.nan, math.inf, 3e38])
def test_child_with_non_finite_weights_is_rejected_and_recorded(tiny_cfg, tmp_path, value):
    cfg = tiny_cfg()  # dense genomes, 12 generations
    base = build_components(cfg)
    comps = Components(PoisonSpace(base.space, value, bad_generation=4), base.skills, base.adapter)
    res = run_cycleqd(comps, cfg, tmp_path / "run", progress=False)
    assert res.generation == 12                                     # the run went on
    metrics = RunDir(tmp_path / "run").read_metrics()
    bad = [m for m in metrics if m["child"] == "g000004"]
    assert len(bad) == 1 and bad[0]["entered"] == [] and not bad[0]["saved"]
    assert "weights not finite" in bad[0]["rejected"] and "tensor" in bad[0]["rejected"]
    assert all("rejected" not in m for m in metrics if m["child"] != "g000004")
    state = _all_elites_finite(tmp_path / "run")
    assert "g000004" not in {e["id"] for a in state["archives"] for e in a["elites"]}
    assert not (RunDir(tmp_path / "run").genomes / "g000004.safetensors").exists()


@pytest.mark.parametrize("duck", [False, True])
def test_nan_skill_score_is_a_failed_evaluation_not_a_dead_run(tiny_cfg, tmp_path, duck):
    cfg = tiny_cfg()
    base = build_components(cfg)
    # skill "b" is called once per seed (3) and once per child: call 3 + 5 = child g000005
    skills = [NaNOnce(s, 8, duck) if s.name == "b" else s for s in base.skills]
    res = run_cycleqd(Components(base.space, skills, base.adapter), cfg, tmp_path / "run", progress=False)
    assert res.generation == 12
    metrics = RunDir(tmp_path / "run").read_metrics()
    bad = [m for m in metrics if m["child"] == "g000005"][0]
    assert "skill 'b' failed" in bad["rejected"] and bad["entered"] == []
    assert "b" not in bad["scores"]
    state = _all_elites_finite(tmp_path / "run")
    assert "g000005" not in {e["id"] for a in state["archives"] for e in a["elites"]}
    for m in metrics:  # QD score and best quality stay numbers
        for st in m["archives"].values():
            assert all(math.isfinite(v) for v in st.values())


def test_expert_with_nan_weight_is_refused_before_any_compute(cache_dir, tmp_path):
    """The synthetic expert's weights get a NaN: build_components names the tensor (before
    the SVD that used to die generations later)."""
    from safetensors.torch import load_file, save_file

    from cycleqd.config import parse_config
    from cycleqd.models.sources import ModelLoadError
    from tests.conftest import tiny_config_dict

    d = tiny_config_dict(tmp_path / "cache")
    cfg = parse_config(d)
    build_components(cfg)  # builds the synthetic models into the cache
    expert_dir = next(p for p in (tmp_path / "cache").rglob("*") if p.is_dir() and p.name.endswith("b")
                      and (p / "model.safetensors").is_file())
    f = expert_dir / "model.safetensors"
    sd = load_file(str(f))
    k = sorted(n for n, t in sd.items() if t.ndim == 2)[0]
    sd[k].view(-1)[0] = float("nan")
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=rf"tensor '{k}' is not finite: 1 NaN"):
        build_components(cfg)
