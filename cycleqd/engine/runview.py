"""A read-only view of a run directory, and the one function that builds a config's weight space.

:func:`weight_space` is what every consumer of a run's models calls -- the engine when it
builds a run (:func:`cycleqd.engine.build.build_components`), ``cycleqd export``, the demo,
a Ray worker's builder -- so the same config always gives the same base, experts, operators
and genome kind (a genome saved by the run loads in the space rebuilt later).

:class:`RunView` reads what a run wrote (``docs/run-directory.md``): its validated
``config.yaml``, ``state.json`` archives, ``metrics.jsonl`` records and stored genomes. It
never writes, takes no lock and imports no torch until a genome is asked for. Used by
``cycleqd report``, ``cycleqd export`` and the demo.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from cycleqd import paths
from cycleqd.config import RunConfig, load_config
from cycleqd.engine.rundir import MODEL_ID, RunDir, RunDirError, check_genomes, elite_scores_problem
from cycleqd.errors import CycleQDError
from cycleqd.qd.archive import Elite, GridArchive


def model_sources(cfg: RunConfig, cache_dir: Path | str | None = None) -> tuple[str, list[str]]:
    """The base and one expert per skill (skill order) of ``cfg``: the configured sources, or
    the folders :func:`cycleqd.models.tiny.build_synthetic_models` makes (built on first use
    under ``<cache>/synthetic/``) for ``model.synthetic``.

    Args:
        cache_dir: cache root; default :func:`cycleqd.paths.cache_dir` of ``cfg``.
    """
    if cfg.model.synthetic is None:
        return cfg.model.base, [cfg.model.experts[s] for s in cfg.skill_names]
    from cycleqd.models.tiny import build_synthetic_models   # torch + transformers

    base, experts = build_synthetic_models(cfg.model.synthetic, cfg.skill_names,
                                           paths.cache_dir(cache_dir or cfg))
    return str(base), [str(experts[s]) for s in cfg.skill_names]


def weight_space(cfg: RunConfig, cache_dir: Path | str | None = None) -> tuple[Any, Any]:
    """The :class:`~cycleqd.ops.space.WeightSpace` of a run config and its
    :class:`~cycleqd.models.build.ModelInfo`: base + experts from :func:`model_sources`,
    ``operators.crossover``/``mutation``/``genome`` as configured.

    Args:
        cfg: a validated run config.
        cache_dir: cache root for GGUF conversions, SVDs and synthetic models; default
            :func:`cycleqd.paths.cache_dir` of ``cfg`` (``cfg.cache_dir``, ``$CYCLEQD_CACHE``,
            ``~/.cache/cycleqd``).
    Returns:
        ``(space, info)`` as :func:`cycleqd.models.build.build_weight_space`.
    Raises:
        as :func:`cycleqd.models.build.build_weight_space` (ValueError, FileNotFoundError,
        ModelLoadError naming the source and tensor).
    """
    from cycleqd.models.build import build_weight_space   # torch

    cache = paths.cache_dir(cache_dir or cfg)
    base, experts = model_sources(cfg, cache)
    ops = cfg.operators
    return build_weight_space(
        base, experts, crossover={"name": ops.crossover.name, **ops.crossover.kwargs()},
        mutation={"name": ops.mutation.name, **ops.mutation.kwargs()}, genome=ops.genome,
        cache_dir=cache)


class ModelIdError(CycleQDError, ValueError):
    """A model id that is not one of the run's models (malformed, or absent from its state)."""


class GenomeNotFoundError(ModelIdError, FileNotFoundError):
    """A well-formed child id that is not an elite of the run's state (no genome of it)."""


class RunView:
    """What one run directory holds, read on demand (each part once).

    Attributes:
        root: the run directory.
        config: its ``config.yaml`` as a validated :class:`~cycleqd.config.RunConfig`.
        state: ``state.json`` (schema-checked dict).
        archives: the archives of ``state.json`` (quality skill order of the config).
        metrics: ``metrics.jsonl`` records (a torn last line is skipped).
        space: the run's weight space: the one given (a caller that already built the run's
            components), else :func:`weight_space` of the config (loads the models).
        model_info: the :class:`~cycleqd.models.build.ModelInfo` of :func:`weight_space`.

    Raises (constructor):
        RunDirError: ``run_dir`` holds no ``config.yaml``.
    Raises (attributes): FileNotFoundError (no ``state.json``: nothing committed yet),
        RunDirError (a damaged state or metrics line), ConfigError (the config no longer
        validates).
    """

    def __init__(self, run_dir: Path | str, *, cache_dir: Path | str | None = None,
                 space: Any = None) -> None:
        self.rd = RunDir(run_dir)
        self.root = self.rd.root
        self._cache_dir = cache_dir
        if space is not None:
            self.space = space   # fills the cached property
        if not self.rd.config.is_file():
            raise RunDirError(f"{self.root} is not a cycleqd run directory (no config.yaml)")

    @cached_property
    def config(self) -> RunConfig:
        return load_config(self.rd.config)

    @cached_property
    def state(self) -> dict[str, Any]:
        return self.rd.load_state()

    @cached_property
    def archives(self) -> list[GridArchive]:
        """The state's archives, once every elite's scores are checked against its
        ``metrics.jsonl`` record (:func:`~cycleqd.engine.rundir.elite_scores_problem`, as on
        resume): a hand-edited score must not decide what export, elites and report pick.

        Raises:
            RunDirError: one line naming the first elite whose scores differ.
        """
        g = self.generation
        by_child = {r["child"]: r for r in self.metrics
                    if r.get("kind") != "aggregate" and "child" in r and r["generation"] <= g}
        why = elite_scores_problem(self.rd, ((e["id"], e["scores"]) for a in self.state["archives"]
                                             for e in a["elites"]), by_child)
        if why:
            raise RunDirError(why)
        return [GridArchive.from_json(a) for a in self.state["archives"]]

    @cached_property
    def metrics(self) -> list[dict[str, Any]]:
        return self.rd.read_metrics()

    @property
    def generation(self) -> int:
        """Generations committed (0: only the seeds were evaluated)."""
        return int(self.state["generation"])

    def archive(self, name: str) -> GridArchive:
        """The archive whose quality skill is ``name``. Raises ValueError naming the archives."""
        by_name = {a.quality_skill: a for a in self.archives}
        if name not in by_name:
            raise ValueError(f"archive {name!r}: the run's archives are {sorted(by_name)}")
        return by_name[name]

    def elites(self) -> list[tuple[str, Elite]]:
        """Every ``(archive name, elite)``, archives in order, cells in index order; an elite
        with its ``scores`` on every skill and its ``id`` (the genome's name)."""
        return [(a.quality_skill, e) for a in self.archives for _, e in a]

    def seed_records(self) -> list[dict[str, Any]]:
        """The metrics records of the seed models' evaluations (generation 0)."""
        return [m for m in self.metrics if m["generation"] == 0]

    def aggregate_scores(self) -> dict[str, float] | None:
        """The aggregated model's scores per skill (its last metrics record), or None before
        the run aggregated."""
        agg = [m for m in self.metrics if m.get("kind") == "aggregate"]
        return dict(agg[-1].get("scores") or {}) if agg else None

    def check_model_id(self, model_id: str) -> str:
        """``model_id`` if it names a model of this run: ``g<6 digits>`` that is an elite of
        the state's archives, ``expert:<skill>`` of a configured skill, ``base``, or
        ``aggregate`` once the run aggregated. Reads no genome and imports no torch.

        Raises:
            ModelIdError: a malformed id (e.g. a path) or one the run does not hold
                (:class:`GenomeNotFoundError`, also a FileNotFoundError, for a child id that
                is not an elite).
            RunDirError, FileNotFoundError: as :attr:`archives` / :attr:`state`.
        """
        if not isinstance(model_id, str) or not MODEL_ID.match(model_id):
            raise ModelIdError(f"model id {model_id!r}: expected g000123, expert:SKILL, base or "
                               f"aggregate (`cycleqd elites {self.root}` lists the run's elites)")
        if model_id.startswith("expert:"):
            if model_id[7:] not in self.config.skill_names:
                raise ModelIdError(f"model {model_id!r}: skills are {self.config.skill_names}")
        elif model_id == "aggregate":
            if self.state.get("aggregate") is None:
                raise ModelIdError(f"model id 'aggregate': the run in {self.root} has not aggregated yet")
        elif model_id != "base" and model_id not in {e.id for _, e in self.elites()}:
            raise GenomeNotFoundError(f"genome of {model_id!r} not found: not an elite of the run in "
                                      f"{self.root} (`cycleqd elites {self.root}` lists them)")
        return model_id

    @cached_property
    def _built(self) -> tuple[Any, Any]:
        return weight_space(self.config, self._cache_dir)

    @cached_property
    def space(self) -> Any:
        return self._built[0]

    @cached_property
    def model_info(self) -> Any:
        return self._built[1]

    def genome(self, model_id: str) -> Any:
        """The genome of ``model_id`` in the run's weight space: ``expert:<skill>``, ``base``,
        or a stored one (``g000123``, ``aggregate``) from ``RUN_DIR/genomes``.

        The id is checked first (:meth:`check_model_id`); a stored genome's SHA-256 must be
        the one ``state.json`` recorded when it was written (as on resume).

        Raises:
            ModelIdError: see :meth:`check_model_id`.
            RunDirError: a stored genome that is missing, damaged, or has no recorded digest.
        """
        self.check_model_id(model_id)
        space, cfg = self.space, self.config
        if model_id.startswith("expert:"):
            skill = model_id.split(":", 1)[1]
            return space.expert_genomes()[cfg.skill_names.index(skill)]
        if model_id == "base":
            return space.base_genome()
        why = check_genomes([model_id], self.state.get("genomes"), self.rd.genomes, space.genome_suffix)
        if why:
            raise RunDirError(f"{self.rd.state} references a bad genome: {why}")
        return space.load(self.rd.genomes / f"{model_id}{space.genome_suffix}")
