"""The vision setting end to end: data -> base/experts -> CycleQD run -> test-split table.

Used by ``cycleqd demo --domain vision`` (:mod:`cycleqd.vision.demo`) and by the ablation
benchmark (``benchmarks/ablate_vision.py``). The QD loop is the engine's
(:func:`cycleqd.engine.loop.run_cycleqd`); this module only builds its
:class:`~cycleqd.engine.loop.Components` (a dense weight space over the CNN's state dict,
the domain-accuracy skills on the *search* splits, the same skills on the *validation*
splits for the final-model choice, the module adapter), and scores the results on the
*test* splits.

Protocol (selection never sees the test images):

* archives and elite sampling use the **search** splits;
* the final model (``final`` config section, :mod:`cycleqd.engine.final`; ``auto`` tries
  every strategy) is chosen on the **validation** splits and recorded in ``final.json``;
* the merge baselines' hyper-parameters (task-arithmetic lambda; TIES density and lambda,
  grid-searched) use the split given to :func:`merge_baselines` (``search`` in the demo,
  ``validation`` in ``benchmarks/vision_fidelity.py``);
* every number in the table is measured on the **test** splits.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cycleqd.ops import CROSSOVERS, MUTATIONS, DenseWeightSpace
from cycleqd.ops.base import TaskVector, TensorSelector, apply_task_vector, task_vector
from cycleqd.vision.adapter import ModuleAdapter
from cycleqd.vision.data import DomainSplit
from cycleqd.vision.skills import DomainAccuracySkill, domain_skills
from cycleqd.vision.training import TrainedModels, VisionRecipe, get_models

BINS = 15  # official number of bins per BC axis
TA_LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TIES_DENSITIES = (0.2, 0.4, 0.6, 0.8, 1.0)
TIES_LAMBDAS = (0.6, 0.8, 1.0, 1.2, 1.5, 2.0)
MODES = ("cyclic", "single")
SCORE_SPLITS = ("search", "validation", "test")  # what VisionSetup.scores accepts
SAMPLINGS = ("elite", "elite_official", "uniform")


@dataclass
class VisionSetup:
    """Everything a vision run needs, built once (and shared by the ablation's runs).

    Attributes:
        recipe: the data/training recipe.
        data: ``{domain: {split: DomainSplit}}`` (``clean`` + the skill domains).
        models: the trained base, experts and multi-domain fine-tune.
        taus: the experts' task vectors in skill order (fp32, DigitCNN names/shapes).
        search_skills / test_skills: one :class:`DomainAccuracySkill` per skill domain.
        validation_skills: the same on the validation splits (the final-model choice).
        clean_test: accuracy on clean test images (reported, not a skill).
        adapter: the module adapter (one DigitCNN).
        bc_ranges: skill -> (lo, hi) of its BC axis (see :func:`bc_ranges`).
        timings: seconds spent building (data, training or cache load).
    """

    recipe: VisionRecipe
    data: dict[str, dict[str, DomainSplit]]
    models: TrainedModels
    taus: list[TaskVector]
    search_skills: list[DomainAccuracySkill]
    test_skills: list[DomainAccuracySkill]
    clean_test: DomainAccuracySkill
    adapter: ModuleAdapter
    bc_ranges: dict[str, tuple[float, float]]
    timings: dict[str, float] = field(default_factory=dict)
    validation_skills: list[DomainAccuracySkill] = field(default_factory=list)

    @property
    def skill_names(self) -> list[str]:
        return list(self.recipe.domains)

    @property
    def base(self) -> dict[str, torch.Tensor]:
        return self.models.base

    def scores(self, weights: Mapping[str, torch.Tensor], *, split: str = "search",
               clean: bool = False) -> dict[str, float]:
        """Accuracy per skill domain of full weights ``weights`` on ``split`` (one of
        :data:`SCORE_SPLITS`), plus ``"clean"`` (test) when ``clean``.

        Raises:
            ValueError: an unknown split, or ``clean`` with a split other than ``test``
                (clean accuracy is a reported test number, never a selection signal).
        """
        skills = self.skills(split)
        if clean and split != "test":
            raise ValueError(f"clean accuracy is measured on the test split only, not {split!r}")
        model = self.adapter.bind(weights, fingerprint=None)  # type: ignore[arg-type]
        out = {s.name: s.evaluate(model).quality for s in skills}
        if clean:
            out["clean"] = self.clean_test.evaluate(model).quality
        return out

    def skills(self, split: str) -> list[DomainAccuracySkill]:
        """The K skills on ``split`` (``search``, ``validation`` or ``test``); ValueError otherwise."""
        if split not in SCORE_SPLITS:
            raise ValueError(f"split must be one of {SCORE_SPLITS}, got {split!r}")
        if split == "validation" and not self.validation_skills:
            self.validation_skills = domain_skills(self.data, self.skill_names, "validation")
        return {"search": self.search_skills, "validation": self.validation_skills,
                "test": self.test_skills}[split]

    def tau_scores(self, tau: TaskVector, **kw) -> dict[str, float]:
        """:meth:`scores` of ``theta_base + tau``."""
        return self.scores(apply_task_vector(self.base, tau), **kw)


def bc_ranges(seed_scores: Sequence[Mapping[str, float]], skills: Sequence[str], *,
              step: float = 0.05) -> dict[str, tuple[float, float]]:
    """BC range per skill: from the lowest search accuracy any seed model (base, experts)
    has on it, rounded down to ``step``, to 1.0 -- so the experts' cells are inside the grid
    and the room above them is what the search can fill (the paper fixes its ranges by
    hand around the experts' scores in the same way)."""
    out = {}
    for s in skills:
        lo = math.floor(min(sc[s] for sc in seed_scores) / step) * step
        out[s] = (max(0.0, min(lo, 1.0 - step)), 1.0)
    return out


def build_setup(recipe: VisionRecipe | None = None, *, toy: bool = False,
                cache_root: str | Path | None = None) -> VisionSetup:
    """Build data, load or train the models (cached by recipe hash), make the skills.

    Args:
        recipe: the recipe (default :class:`VisionRecipe` or ``VisionRecipe.toy()``).
        toy: use the toy recipe when ``recipe`` is None.
        cache_root: model cache root (default :func:`cycleqd.paths.cache_dir`).
    """
    recipe = recipe or (VisionRecipe.toy() if toy else VisionRecipe())
    t = time.perf_counter()
    data = recipe.build_data()
    t_data = time.perf_counter() - t
    t = time.perf_counter()
    models = get_models(recipe, cache_root=cache_root, data=data)
    t_models = time.perf_counter() - t
    taus = [task_vector(models.experts[d], models.base) for d in recipe.domains]
    search = domain_skills(data, recipe.domains, "search")
    test = domain_skills(data, recipe.domains, "test")
    adapter = ModuleAdapter(recipe.new_model())
    setup = VisionSetup(recipe, data, models, taus, search, test,
                        DomainAccuracySkill("clean", data["clean"]["test"]), adapter, {},
                        {"data_s": t_data, "models_s": t_models,
                         "models_cached": float(bool(models.log.get("cache_hit")))},
                        domain_skills(data, recipe.domains, "validation"))
    seeds = [setup.scores(models.base)] + [setup.scores(models.experts[d]) for d in recipe.domains]
    setup.bc_ranges = bc_ranges(seeds, recipe.domains)
    return setup


# --- operators ------------------------------------------------------------------------

def gaussian_std_matched(taus: Sequence[TaskVector], rate: float = 0.1) -> float:
    """The std of Gaussian noise with the same expected energy, on the same matrices, as
    the SVD-expert mutation with ``rate``.

    For ``r ~ U(0, rate)``, ``E||U diag(s r) V^T||_F^2 = rate^2 / 3 * ||tau_q[W]||_F^2``, so the
    per-element RMS is ``rate / sqrt(3) * ||tau_q[W]||_F / sqrt(numel(W))``; averaged over
    experts and matrices (weighted by size). Used so that the SVD-vs-Gaussian ablation
    compares the *direction* of the noise, not its size.
    """
    select = TensorSelector()
    num, den = 0.0, 0
    for tau in taus:
        for k, t in tau.items():
            if select(k, t.shape):
                num += float(t.float().pow(2).sum()) * rate ** 2 / 3.0
                den += t.numel()
    if den == 0:
        raise ValueError("gaussian_std_matched: no matrices in the task vectors")
    return math.sqrt(num / den)


def make_mutation(name: str, taus: Sequence[TaskVector], *, rate: float = 0.1,
                  gaussian_std: float | None = None) -> tuple[Any, dict]:
    """Mutation operator from the registry plus the kwargs recorded in the run config.

    Args:
        name: ``svd_expert`` (official), ``svd_self``, ``gaussian`` (std matched to the SVD
            mutation's energy unless ``gaussian_std`` is given; matrices only) or ``none``.
    Raises:
        ValueError: unknown name.
    """
    if name not in MUTATIONS:
        raise ValueError(f"mutation must be one of {sorted(MUTATIONS)}, got {name!r}")
    if name in ("svd_expert", "svd_self"):
        kw: dict = {"rate": rate}
    elif name == "gaussian":
        kw = {"std": float(gaussian_std if gaussian_std is not None else gaussian_std_matched(taus, rate)),
              "matrices_only": True}
    else:
        kw = {}
    return MUTATIONS[name](experts=list(taus), **kw), kw


# --- baselines ------------------------------------------------------------------------

def _mean(d: Mapping[str, float], keys: Sequence[str]) -> float:
    return float(sum(d[k] for k in keys) / len(keys))


def merge_baselines(setup: VisionSetup, *, split: str = "search") -> dict[str, dict[str, Any]]:
    """Task arithmetic and TIES over the K experts, hyper-parameters chosen by the mean
    accuracy on ``split`` (grids :data:`TA_LAMBDAS`; :data:`TIES_DENSITIES` x
    :data:`TIES_LAMBDAS`; ties: the first in grid order).

    Args:
        split: ``search`` (the demo) or ``validation`` (the split CycleQD's final model is
            chosen on); never ``test``.
    Returns:
        ``{"task_arithmetic": {"tau": TaskVector, "params": {...}, "split": split,
        <split>: {skill: accuracy}}, "ties": {...}}``.
    Raises:
        ValueError: ``split`` is not ``search`` or ``validation``.
    """
    if split not in ("search", "validation"):
        raise ValueError(f"merge_baselines: tune on 'search' or 'validation', got {split!r}")
    g = torch.Generator().manual_seed(0)  # both merges are deterministic
    names = setup.skill_names
    out: dict[str, dict[str, Any]] = {}
    best = None
    for lam in TA_LAMBDAS:
        tau = CROSSOVERS["task_arithmetic"](weights=1.0, **{"lambda": lam})(setup.taus, generator=g)
        sc = setup.tau_scores(tau, split=split)
        if best is None or _mean(sc, names) > _mean(best[2], names):
            best = (tau, {"lambda": lam}, sc)
    out["task_arithmetic"] = {"tau": best[0], "params": best[1], "split": split, split: best[2]}
    best = None
    for dens in TIES_DENSITIES:
        for lam in TIES_LAMBDAS:
            tau = CROSSOVERS["ties"](weights=1.0, density=dens, **{"lambda": lam})(setup.taus, generator=g)
            sc = setup.tau_scores(tau, split=split)
            if best is None or _mean(sc, names) > _mean(best[2], names):
                best = (tau, {"density": dens, "lambda": lam}, sc)
    out["ties"] = {"tau": best[0], "params": best[1], "split": split, split: best[2]}
    return out


# --- the CycleQD run ------------------------------------------------------------------

def run_config(setup: VisionSetup, *, generations: int, seed: int, mode: str = "cyclic",
               sampling: str = "elite", mutation: str = "svd_expert", mutation_kwargs: dict | None = None,
               aggregation: str | None = None, snapshot_every: int = 100,
               final: str | Mapping[str, Any] | None = None, crossover_sigma: float = 0.01,
               use_cma: bool = False, bins: int = BINS):
    """The engine's :class:`~cycleqd.config.RunConfig` for a vision run (skills of type
    ``external``; the model paths point at the cached safetensors, for the record).

    ``final``: the ``final`` section (:class:`~cycleqd.config.FinalConfig`), a strategy name
    (``"auto"`` tries them all on validation) or ``{"strategy": ..., "params": ...}``; None
    keeps ``operators.aggregation`` (default ``mean``). Raises ConfigError for both set.
    ``crossover_sigma``: the linear crossover's std (official 0.01); ``use_cma``: the
    official ``qd.use_cma`` (per-child mu, sigma, rate from CMA-ES); ``bins``: bins per BC
    axis (official 15)."""
    from cycleqd.config import (
        FinalConfig,
        ModelConfig,
        OperatorConfig,
        OperatorsConfig,
        QDConfig,
        RunConfig,
        SkillConfig,
        check_operators,
    )

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    skills = [SkillConfig(name=d, type="external", bc_range=setup.bc_ranges[d], bins=bins,
                          params={"evaluator": "cycleqd.vision.skills.DomainAccuracySkill",
                                  "domain": d, "split": "search", "n": len(setup.data[d]["search"])})
              for d in setup.skill_names]
    ops = {"crossover": OperatorConfig(name="linear", sigma=crossover_sigma),
           "mutation": OperatorConfig(name=mutation, **(mutation_kwargs or {})), "genome": "dense"}
    if aggregation is not None:
        ops["aggregation"] = OperatorConfig(name=aggregation)
    fin = FinalConfig() if final is None else FinalConfig(
        **({"strategy": final} if isinstance(final, str) else dict(final)))
    cfg = RunConfig(
        name=f"vision-digits-{mode}-{mutation}-{sampling}", seed=seed, skills=skills, final=fin,
        model=ModelConfig(base=str(setup.models.file("base")),
                          experts={d: str(setup.models.file(f"expert_{d}")) for d in setup.skill_names}),
        operators=OperatorsConfig(**ops),
        qd=QDConfig(generations=generations, mode=mode, sampling=sampling, use_cma=use_cma,
                    snapshot_every=max(1, min(snapshot_every, generations or 1))),
        cache_dir=str(setup.models.path))
    check_operators(cfg)
    return cfg


def cyclic_qd_score(elites: Sequence[Any], setup: VisionSetup) -> dict[str, float]:
    """QD score of a set of elites as the K cyclic archives (the demo's ranges and bins)
    would hold them: every elite is offered to every archive. For a cyclic run this
    equals the run's own archives; for the single-archive ablation it makes its elites
    comparable. Returns ``{"qd_score": sum over archives, "<skill>": per archive,
    "coverage": mean coverage}``."""
    from cycleqd.qd.archive import make_archives
    from cycleqd.qd.metrics import coverage, qd_score

    names = setup.skill_names
    archives = make_archives(names, setup.bc_ranges, {n: BINS for n in names})
    for e in elites:
        for a in archives:
            a.add(e)
    out = {a.quality_skill: qd_score(a) for a in archives}
    out["qd_score"] = float(sum(out.values()))
    out["coverage"] = float(sum(coverage(a) for a in archives) / len(archives))
    return out


@dataclass
class EngineRun:
    """A finished vision run (:func:`engine_run`): the engine's result, its config, weight
    space and model store (``store.get(id)`` -> task vector; ``"aggregate"`` is the final
    model), the mutation's recorded kwargs and the run's wall time (seconds)."""

    result: Any
    cfg: Any
    space: DenseWeightSpace
    store: Any
    mutation_kwargs: dict
    wall_s: float


def engine_run(setup: VisionSetup, run_dir: str | Path, *, generations: int, seed: int,
               mode: str = "cyclic", sampling: str = "elite", mutation: str = "svd_expert",
               progress: bool = False, aggregation: str | None = None,
               final: str | Mapping[str, Any] | None = None, mutation_rate: float = 0.1,
               crossover_sigma: float = 0.01, use_cma: bool = False, bins: int = BINS) -> EngineRun:
    """One CycleQD run with the engine and nothing else (no test split is built or scored):
    search-split skills, validation-split skills for the final choice (``Components.validation``),
    the dense weight space over the CNN. Arguments: see :func:`run_search`; ``mutation_rate``
    (SVD mutation ``r ~ U(0, rate)``, official 0.1; the Gaussian ablation's std is matched to
    it), ``crossover_sigma``, ``use_cma``, ``bins``: see :func:`run_config`."""
    from cycleqd.engine.loop import Components, run_cycleqd, seed_ids
    from cycleqd.executors.store import GenomeStore

    mut, mut_kw = make_mutation(mutation, setup.taus, rate=mutation_rate)
    cfg = run_config(setup, generations=generations, seed=seed, mode=mode, sampling=sampling,
                     mutation=mutation, mutation_kwargs=mut_kw, aggregation=aggregation, final=final,
                     crossover_sigma=crossover_sigma, use_cma=use_cma, bins=bins)
    space = DenseWeightSpace(setup.base, setup.taus, CROSSOVERS["linear"](sigma=crossover_sigma), mut)
    comps = Components(space=space, skills=list(setup.skills("search")), adapter=setup.adapter,
                       validation=lambda: list(setup.skills("validation")))
    t = time.perf_counter()
    res = run_cycleqd(comps, cfg, run_dir, progress=progress)
    wall = time.perf_counter() - t
    store = GenomeStore(Path(run_dir) / "genomes", space, dict(zip(seed_ids(cfg), setup.taus)))
    return EngineRun(res, cfg, space, store, mut_kw, wall)


def run_search(setup: VisionSetup, run_dir: str | Path, *, generations: int, seed: int,
               mode: str = "cyclic", sampling: str = "elite", mutation: str = "svd_expert",
               progress: bool = False, aggregation: str | None = None,
               final: str | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One CycleQD run with the engine, then the test-split scores of its products.

    The run's skills are the search-split skills; its ``Components.validation`` the same
    domains on the validation split, on which the final model is chosen (``final``: see
    :func:`run_config`; the engine writes ``RUN_DIR/final.json``). The test split is scored
    only after the run has finished.

    Returns a JSON-able dict: ``config`` (mode, sampling, mutation and its kwargs),
    ``wall_s``, ``qd`` (engine archive stats and :func:`cyclic_qd_score`), ``best``
    (per archive: elite id, search scores, test scores incl. clean), ``best_per_skill``
    (per skill k: the elite with the highest search score on k, its test score on k),
    ``best_mean`` (the elite with the highest mean search accuracy: id, search and test
    scores),
    ``aggregate`` (search + test scores, or None when the engine produced no aggregated
    model), ``mean_test`` (aggregate's mean test accuracy over the skills, if any),
    ``final`` (the engine's ``final.json`` record: strategy, chosen, every candidate's
    validation scores; None if absent).
    """
    er = engine_run(setup, run_dir, generations=generations, seed=seed, mode=mode, sampling=sampling,
                    mutation=mutation, progress=progress, aggregation=aggregation, final=final)
    res, store, mut_kw, wall = er.result, er.store, er.mutation_kwargs, er.wall_s
    names = setup.skill_names
    best = {}
    for a in res.archives:
        e = a.best()
        best[a.quality_skill] = {"id": e.id, "search": dict(e.scores),
                                 "test": setup.tau_scores(store.get(e.id), split="test", clean=True)}
    agg = None
    if res.aggregate is not None:
        agg_tau = store.get("aggregate")
        agg = {"search": dict(res.aggregate), "test": setup.tau_scores(agg_tau, split="test", clean=True)}
    all_elites = [e for a in res.archives for _, e in a]
    # the best model per skill k: the elite with the highest search score on k (in cyclic
    # mode that is archive k's best, since every child is offered to every archive)
    per_skill = {}
    for k in names:
        e = max(all_elites, key=lambda el: el.scores[k])
        per_skill[k] = {"id": e.id, "search": e.scores[k],
                        "test": best[k]["test"][k] if best.get(k, {}).get("id") == e.id
                        else setup.tau_scores(store.get(e.id), split="test")[k]}
    # the single model from the archives with the highest mean search accuracy
    e = max(all_elites, key=lambda el: _mean(el.scores, names))
    best_mean = {"id": e.id, "search": dict(e.scores),
                 "test": setup.tau_scores(store.get(e.id), split="test", clean=True)}
    out = {
        "config": {"mode": mode, "sampling": sampling, "mutation": mutation, "mutation_kwargs": mut_kw,
                   "generations": generations, "seed": seed, "bc_ranges": setup.bc_ranges},
        "run_dir": str(run_dir), "wall_s": wall,
        "qd": {"engine": res.stats, **cyclic_qd_score(all_elites, setup)},
        "best": best, "best_per_skill": per_skill, "best_mean": best_mean, "aggregate": agg,
    }
    if agg is not None:
        out["mean_test"] = _mean(agg["test"], names)
    fj = Path(run_dir) / "final.json"
    out["final"] = json.loads(fj.read_text()) if fj.is_file() else None
    return out
