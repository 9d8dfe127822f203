"""Operator parameters proposed by CMA-ES, one solver per quality skill (official ``qd.use_cma``).

The official code (SakanaAI/CycleQD ``main.py``: ``Worker.__init__`` builds the solvers
(~L65-91), ``Worker.merge_models`` asks (~L110-121) and tells (~L170-186),
``Worker._get_input_info`` sizes the input; ``configs/config.yaml`` ``qd.use_cma: False``,
``cma_es: {popsize: 8, sigma: 0.01, seed: 42}``; ``crossover/base.py`` and
``mutation/base.py`` take the params in ``merge``/``mutate``)
gives each task a ``cma.CMAEvolutionStrategy(x0=zeros(n_in * 3), sigma0=0.01, popsize=8)``.
For a child of quality skill k with parents p1, p2 drawn from archive k:

    x      = (cell(p1) ++ cell(p2)) / (bins ++ bins)           (n_in,)  n_in = 2 * BC dims, no bias
    W      = solution[i].reshape(n_in, 3)                       i = the child's index in the population
    (mu, sigma, rate) = x @ W                                   no clipping, no squashing

``mu``/``sigma`` go to the linear crossover (``crossover/model_linear.py``: ``w_i ~ N(1 + mu,
|sigma|)``), ``rate`` to the mutation (``mutation/svd_uniform_mutator.py``: ``r ~ U(0, 1) *
rate``, sign kept). Once 8 children of skill k are evaluated the solver is told
``-(sum(cell(child) / bins) + quality_k(child))`` (CMA minimises), the cell and quality
taken in archive k. With K = 3 skills, archive k has 2 BC axes: n_in = 4, W is 4x3.

Differences from the official code: the solver's normal draws come from its own
``numpy.random.RandomState(derive_seed(seed, 0, "cma:<k>"))`` (official: the global
``np.random.randn`` seeded 42, shared by all solvers); one policy serves the whole run
(official: one per worker process); a rejected child (non-finite weights or scores, which
the official code does not survive) is told fitness 0, the lowest possible.

The solver state is the told fitnesses: :meth:`CMAParameterPolicy.to_json` records them
and :meth:`CMAParameterPolicy.restore` replays them (the solutions are re-drawn from the
seeded generator), so a resumed run proposes exactly what an uninterrupted one does,
without pickles in the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import cma
import numpy as np

from cycleqd.qd.archive import GridArchive
from cycleqd.qd.scheduler import derive_seed

#: the proposed operator parameters, in the official output order
OUTPUTS = ("mu", "sigma", "rate")


@dataclass(frozen=True)
class OperatorParams:
    """One child's operator parameters: crossover ``w_i ~ N(1 + mu, |sigma|)``, mutation
    scale ``rate`` (may be negative, as in the official code)."""

    mu: float
    sigma: float
    rate: float

    def crossover(self) -> dict[str, float]:
        return {"mu": self.mu, "sigma": self.sigma}

    def mutation(self) -> dict[str, float]:
        return {"rate": self.rate}

    def to_json(self) -> dict[str, float]:
        return {"mu": self.mu, "sigma": self.sigma, "rate": self.rate}


def cma_fitness(archive: GridArchive, scores: dict[str, float] | None) -> float:
    """The official fitness of a child in archive ``archive`` (to be maximised):
    ``sum_j cell_j / bins_j + quality``; 0.0 for a rejected child (``scores`` None)."""
    if scores is None:
        return 0.0
    cell = archive.cell_of(scores)
    return float(sum(c / a.bins for c, a in zip(cell, archive.axes)) + archive.quality_of(scores))


def normalised_input(archive: GridArchive, parent_cells: Sequence[Sequence[int]]) -> np.ndarray:
    """The solver's input: the parents' cells, concatenated in draw order, each id divided by
    its axis's bin count. Returns float64 ``(num_parents * archive.ndim,)``."""
    bins = np.array([a.bins for a in archive.axes], dtype=np.float64)
    return np.concatenate([np.asarray(c, dtype=np.float64) / bins for c in parent_cells])


class CMAParameterPolicy:
    """One CMA-ES (pycma) per archive proposing :class:`OperatorParams` per child.

    Args:
        archives: the run's archives (one per quality skill; their BC axes fix the input size
            ``num_parents * len(axes)``).
        seed: run seed; solver k draws from ``derive_seed(seed, 0, f"cma:{k}")``.
        num_parents: parents per child (official 2).
        popsize: children per CMA generation (official 8).
        sigma0: initial step size (official 0.01); x0 = 0.

    Raises:
        ValueError: ``popsize`` < 2 or ``sigma0`` <= 0.
    """

    def __init__(self, archives: Sequence[GridArchive], *, seed: int, num_parents: int = 2,
                 popsize: int = 8, sigma0: float = 0.01):
        if popsize < 2:
            raise ValueError(f"cma popsize must be >= 2, got {popsize}")
        if not sigma0 > 0:
            raise ValueError(f"cma sigma0 must be > 0, got {sigma0}")
        self.archives = list(archives)
        self.seed, self.num_parents, self.popsize, self.sigma0 = seed, num_parents, popsize, float(sigma0)
        self.n_in = [num_parents * len(a.axes) for a in self.archives]
        self._es = [self._new_es(k) for k in range(len(self.archives))]
        self._pop: list[list[np.ndarray] | None] = [None] * len(self.archives)
        self._asked = [0] * len(self.archives)       # children handed solutions of the current population
        self._told: list[list[float]] = [[] for _ in self.archives]    # their fitnesses so far
        self._history: list[list[float]] = [[] for _ in self.archives]  # every fitness told, in order

    def _new_es(self, k: int) -> cma.CMAEvolutionStrategy:
        rs = np.random.RandomState(derive_seed(self.seed, 0, f"cma:{k}") % 2**32)
        return cma.CMAEvolutionStrategy(
            np.zeros(self.n_in[k] * len(OUTPUTS)), self.sigma0,
            inopts={"popsize": self.popsize, "seed": np.nan, "randn": rs.randn,
                    "verbose": -9, "verb_disp": 0, "verb_log": 0})

    def ready(self, k: int) -> bool:
        """Whether skill k can propose now: False once its population is handed out and not
        yet told (the caller waits for those children's results)."""
        return self._asked[k] < self.popsize

    def ask(self, k: int, parent_cells: Sequence[Sequence[int]]) -> OperatorParams:
        """Parameters for the next child of skill ``k`` whose parents sit in ``parent_cells``
        of archive k (draw order).

        Raises:
            RuntimeError: skill k's population is handed out and not yet told (see :meth:`ready`).
            ValueError: ``parent_cells`` does not give ``num_parents`` cells of archive k's shape.
        """
        if not self.ready(k):
            raise RuntimeError(f"cma: skill {k}'s {self.popsize} solutions are handed out; tell their fitnesses first")
        x = normalised_input(self.archives[k], parent_cells)
        if x.size != self.n_in[k]:
            raise ValueError(f"cma: skill {k} needs {self.num_parents} parent cells of "
                             f"{len(self.archives[k].axes)} ids, got {list(parent_cells)}")
        if self._asked[k] == 0:
            self._pop[k] = self._es[k].ask()
        w = np.asarray(self._pop[k][self._asked[k]]).reshape(self.n_in[k], len(OUTPUTS))
        self._asked[k] += 1
        return OperatorParams(*(float(v) for v in x @ w))

    def tell(self, k: int, fitness: float) -> bool:
        """Record the fitness (maximised) of skill k's oldest untold child; once the
        population's ``popsize`` are in, update the solver. Returns whether it updated.

        Raises:
            RuntimeError: no child of skill k is awaiting its fitness.
        """
        if len(self._told[k]) >= self._asked[k]:
            raise RuntimeError(f"cma: tell for skill {k} without an outstanding ask")
        self._told[k].append(float(fitness))
        self._history[k].append(float(fitness))
        if len(self._told[k]) < self.popsize:
            return False
        self._es[k].tell(self._pop[k], [-f for f in self._told[k]])
        self._pop[k], self._asked[k], self._told[k] = None, 0, []
        return True

    def to_json(self) -> dict[str, Any]:
        """The state as of the last tell (outstanding asks are not part of it: a resumed
        run asks them again): every fitness told, per skill, in order."""
        return {"library": f"cma {cma.__version__}", "popsize": self.popsize, "sigma0": self.sigma0,
                "fitnesses": [list(h) for h in self._history]}

    def restore(self, state: dict[str, Any]) -> None:
        """Replay a :meth:`to_json` state into this (fresh) policy: the solvers end exactly
        where the recording run's were after its last tell.

        Raises:
            ValueError: the state was recorded with another popsize, sigma0 or skill count.
        """
        fits = state.get("fitnesses")
        if state.get("popsize") != self.popsize or state.get("sigma0") != self.sigma0 \
                or not isinstance(fits, list) or len(fits) != len(self.archives):
            raise ValueError(f"cma state (popsize {state.get('popsize')}, sigma0 {state.get('sigma0')}, "
                             f"{len(fits) if isinstance(fits, list) else fits} skills) does not match this run "
                             f"(popsize {self.popsize}, sigma0 {self.sigma0}, {len(self.archives)} skills)")
        for k, h in enumerate(fits):
            for f in h:
                if self._asked[k] == 0:
                    self._pop[k] = self._es[k].ask()
                self._asked[k] += 1
                self.tell(k, f)
