"""Contracts that every registered part keeps, run over every name in the registries
(pyribs' ``tests/archives/`` style): a part registered later is tested without a new test.

Which contracts apply to which kind:

| contract                              | crossover | mutation        | aggregation | skill |
|---------------------------------------|-----------|-----------------|-------------|-------|
| keys, shapes preserved; fp32 out      | yes       | yes             | yes         | -     |
| inputs untouched                      | yes       | yes             | yes         | -     |
| same generator (seed) -> same output  | yes       | yes             | yes         | -     |
| one parent -> that parent             | yes (1)   | rate 0 -> input | yes (1)     | -     |
| source declared                       | yes       | yes             | yes         | yes   |
| documented params check; a misspelt   | yes       | yes             | yes         | yes   |
| one is a field-path ConfigError       |           |                 |             |       |

(1) with the parameters under which the operator defines it (``IDENTITY``); operators that
need exactly two parents (``n_parents == 2``: slerp) have no one-parent form.
"""

from __future__ import annotations

import pytest
import torch

import cycleqd.ops  # noqa: F401  (registers the built-in operators)
from cycleqd.ops.space import DenseWeightSpace
from cycleqd.registry import AGGREGATIONS, CROSSOVERS, MUTATIONS, SKILLS, ConfigError

#: parameters under which one parent (or one archive's best) merges to itself
IDENTITY = {"linear": {}, "task_arithmetic": {}, "ties": {"density": 1.0},
            "dare": {"density": 1.0}, "dare_ties": {"density": 1.0}, "paper": {}, "mean": {},
            "quality": {}, "quality_weighted": {}, "weighted": {"weights": [1.0]},
            "weight_search": {"budget": 0}, "best_elite": {}}
#: aggregations whose one-archive identity needs other parameters than the crossover's
AGG_IDENTITY = {**IDENTITY, "task_arithmetic": {"lambdas": [1.0]}}
#: mutation parameters that make it the identity ("none" is one already)
ZERO = {"svd_expert": {"rate": 0.0}, "svd_self": {"rate": 0.0}, "gaussian": {"std": 0.0}, "none": {}}
#: parameters a part needs beyond its defaults (per number of parents / archives)
REQUIRED = {"weighted": lambda n: {"weights": [1.0 / n] * n}}


def _taus(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"layers.0.mlp.weight": torch.randn(6, 4, generator=g),
             "layers.0.norm.weight": torch.randn(4, generator=g),
             "embed_tokens.weight": torch.randn(5, 4, generator=g)} for _ in range(n)]


def _base() -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in _taus(1)[0].items()}


def _clone(tv):
    return [{k: v.clone() for k, v in t.items()} for t in tv]


def _same(a, b) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def _shapes_kept(out, like) -> None:
    assert list(out) == list(like)
    for k in like:
        assert out[k].shape == like[k].shape and out[k].dtype == torch.float32, k


def _params(name: str, n: int) -> dict:
    return REQUIRED[name](n) if name in REQUIRED else {}


# --- crossovers -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CROSSOVERS.names())
def test_crossover_contract(name):
    op = CROSSOVERS.build(name, _params(name, 2), base=_base())
    parents = _taus(2)
    kept = _clone(parents)
    a = op(parents, generator=torch.Generator().manual_seed(3))
    _shapes_kept(a, parents[0])
    assert all(_same(p, q) for p, q in zip(parents, kept)), "parents modified"
    b = op(parents, generator=torch.Generator().manual_seed(3))
    assert _same(a, b), "same generator, different child"
    if getattr(op, "n_parents", None) == 2:
        return
    assert name in IDENTITY, f"{name}: say in IDENTITY how one parent merges to itself"
    one = CROSSOVERS.build(name, IDENTITY[name], base=_base())(parents[:1], generator=torch.Generator())
    torch.testing.assert_close(one, parents[0], rtol=1e-6, atol=1e-7)


# --- mutations --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MUTATIONS.names())
def test_mutation_contract(name):
    experts = _taus(2, seed=1)
    op = MUTATIONS.build(name, {}, experts=experts)
    child = _taus(1, seed=2)[0]
    kept = _clone([child])[0]
    a = op(child, skill=1, generator=torch.Generator().manual_seed(4))
    _shapes_kept(a, child)
    assert _same(child, kept), "child modified in place"
    b = op(child, skill=1, generator=torch.Generator().manual_seed(4))
    assert _same(a, b), "same generator, different result"
    assert name in ZERO, f"{name}: say in ZERO which parameters make it the identity"
    z = MUTATIONS.build(name, ZERO[name], experts=experts)(child, skill=1, generator=torch.Generator())
    torch.testing.assert_close(z, child, rtol=1e-6, atol=1e-6)


# --- aggregations -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", AGGREGATIONS.names())
def test_aggregation_contract(name):
    experts = _taus(2)
    space = DenseWeightSpace(_base(), experts, CROSSOVERS.build("linear"), MUTATIONS.build("none"))
    genomes = _taus(2, seed=5)
    kept = _clone(genomes)
    fn = AGGREGATIONS.build(name, _params(name, 2))
    # a validation scorer for the strategies that choose (never the test split)
    score = lambda g: {"s": -float(sum((v - 0.3).square().sum() for v in g.values()))}  # noqa: E731
    a = fn(space, genomes, [0.5, 0.7], score=score)
    _shapes_kept(a, genomes[0])
    assert all(_same(p, q) for p, q in zip(genomes, kept)), "models modified"
    assert _same(a, AGGREGATIONS.build(name, _params(name, 2))(space, genomes, [0.5, 0.7], score=score))
    if name == "slerp":   # exactly two archives
        return
    assert name in AGG_IDENTITY, f"{name}: say in IDENTITY how one model aggregates to itself"
    one = AGGREGATIONS.build(name, AGG_IDENTITY[name])(space, genomes[:1], [0.5])
    torch.testing.assert_close(one, genomes[0], rtol=1e-6, atol=1e-7)


# --- every registry: sources, checks, field paths ---------------------------------------------
_ALL = [(r, n) for r in (CROSSOVERS, MUTATIONS, AGGREGATIONS, SKILLS) for n in r.names()]
#: the documented minimal parameters of each skill (docs/skills.md)
MINIMAL = {"lmeval": {"task": "arc_easy"}}


@pytest.mark.parametrize("registry,name", _ALL, ids=[f"{r.kind}-{n}" for r, n in _ALL])
def test_every_part_declares_its_source_and_checks_a_misspelt_parameter(registry, name):
    e = registry.entry(name)
    assert e.source and e.kind == registry.kind
    minimal = {**_params(name, 2), **(MINIMAL.get(name, {}) if registry is SKILLS else {})}
    if registry is SKILLS and name == "lmeval":
        pytest.importorskip("lm_eval")
    registry.check(name, minimal, field="x.params")          # builds nothing, raises nothing
    settable = [k for k, p in e.parameters().items() if p.kind is not p.VAR_KEYWORD]
    if not settable:
        with pytest.raises(ConfigError, match=r"^x\.params\.bogus: .* takes no argument 'bogus'"):
            registry.check(name, {**minimal, "bogus": 1}, field="x.params")
        return
    right = max(settable, key=len)
    wrong = right[:-1] + ("x" if right[-1] != "x" else "y")
    with pytest.raises(ConfigError, match=rf"^x\.params\.{wrong}: .*did you mean '{right}'\?"):
        registry.check(name, {**minimal, wrong: 1}, field="x.params")


def test_unknown_names_suggest_the_registered_one():
    with pytest.raises(ConfigError, match=r"operators.crossover.name: unknown crossover 'lienar' "
                                          r"\(did you mean 'linear'\?\)"):
        CROSSOVERS.check("lienar", {}, field="operators.crossover")
    with pytest.raises(ConfigError, match=r"skills.0.params.name: unknown skill 'mbbp'.*'mbpp'"):
        SKILLS.check("mbbp", {}, field="skills.0.params")


def test_svd_genome_compatibility_is_declared_at_registration():
    from cycleqd.ops.genome import genome_compatible
    from cycleqd.registry import svd_genome_compatible

    xs = {n for n in CROSSOVERS.names() if CROSSOVERS.entry(n).svd_genome}
    ms = {n for n in MUTATIONS.names() if MUTATIONS.entry(n).svd_genome}
    assert xs == {"linear", "task_arithmetic"} and ms == {"svd_expert", "none"}
    assert svd_genome_compatible("linear", "svd_expert") and not svd_genome_compatible("ties", "none")
    built = CROSSOVERS.build("task_arithmetic"), MUTATIONS.build("gaussian")
    assert genome_compatible(built[0], MUTATIONS.build("none")) and not genome_compatible(*built)


def test_registering_twice_or_without_a_source_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        CROSSOVERS.register("linear", source="x")(lambda: None)
    with pytest.raises(ValueError, match="source"):
        CROSSOVERS.register("another", source="")


def test_the_synthetic_skill_builds_from_its_minimal_params():
    base, target = _base(), _taus(1)[0]
    skill = SKILLS.build("synthetic", {}, field="skills.0.params", name="a", base=base, target=target)
    assert skill.name == "a" and 0.0 <= skill.evaluate(target).quality <= 1.0
    with pytest.raises(ConfigError, match=r"skills.0.params.temprature: .*did you mean 'temperature'"):
        SKILLS.build("synthetic", {"temprature": 2.0}, field="skills.0.params", name="a", base=base,
                     target=target)
