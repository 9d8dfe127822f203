"""The CycleQD cycle as an ask/tell scheduler (paper Algorithm 1; pyribs' Scheduler shape).

``ask(g)`` picks generation g's quality skill (``k = (g // flip_interval) mod K``, the
official rotation) and the expert whose SVD basis the mutation follows, and draws the
parents from archive k; ``tell(g, child)`` offers the evaluated child to *every* archive;
``tell_seed(elite)`` puts a scored seed model (expert, base) into every archive before
the first ask. This module is the only place the rotation is written. Asks must come in generation order and tells in the
same order; several asks may be outstanding (asynchronous executors), each sampling from
the archives as they were when it was asked. Out-of-order calls raise RuntimeError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cycleqd.qd.archive import Elite, GridArchive
from cycleqd.qd.sampling import Scheme, sample_parents


def derive_seed(seed: int, generation: int, purpose: str) -> int:
    """A 63-bit seed that depends only on (run seed, generation, purpose)."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(generation), *purpose.encode()])
    return int(ss.generate_state(2, dtype=np.uint32).astype(np.uint64) @ np.array([1, 2**31], dtype=np.uint64)) & (2**63 - 1)


@dataclass(frozen=True)
class Ask:
    """What generation ``generation`` must do: breed ``parents`` (drawn from archive
    ``skill``) and mutate the child along expert ``basis``'s singular vectors.

    ``basis == skill`` in cyclic mode; in the single-archive ablation ``skill`` is always 0
    and ``basis`` still rotates over the K skills (the official code's cyclic mutation).
    ``cells`` holds each parent's cell in archive ``skill`` (the CMA-ES policy's input).
    """

    generation: int
    skill: int
    parents: tuple[str, ...]
    basis: int
    cells: tuple[tuple[int, ...], ...] = ()


class CycleQDScheduler:
    """Cyclic quality rotation over K archives.

    Args:
        archives: the archives; in ``cyclic`` mode one per skill in skill order, in
            ``single`` mode (ablation) exactly one.
        seed: run seed; generation g's parent sampling uses ``derive_seed(seed, g, "sampling")``.
        sampling: elite-sampling scheme (see :mod:`cycleqd.qd.sampling`).
        flip_interval: generations per quality skill (official default 1).
        num_parents: parents per child (paper: 2).
        num_skills: K, the experts the mutation basis rotates over; default
            ``len(archives)`` (cyclic mode); the single-archive ablation passes K.

    Raises:
        ValueError: ``flip_interval`` or ``num_skills`` < 1.
    """

    def __init__(self, archives: Sequence[GridArchive], *, seed: int, sampling: Scheme = "elite",
                 flip_interval: int = 1, num_parents: int = 2, num_skills: int | None = None):
        if flip_interval < 1:
            raise ValueError(f"flip_interval must be >= 1, got {flip_interval}")
        if num_skills is not None and num_skills < 1:
            raise ValueError(f"num_skills must be >= 1, got {num_skills}")
        self.archives = list(archives)
        self.seed, self.sampling = seed, sampling
        self.flip_interval, self.num_parents = flip_interval, num_parents
        self.num_skills = num_skills or len(self.archives)
        self._asked: list[int] = []
        self._last_told: int | None = None

    def quality_skill(self, generation: int) -> int:
        """Index of the archive whose quality is optimised in ``generation``."""
        return (generation // self.flip_interval) % len(self.archives)

    def basis_skill(self, generation: int) -> int:
        """Index of the expert whose SVD basis mutates ``generation``'s child: the same
        rotation over the K skills (equal to :meth:`quality_skill` in cyclic mode)."""
        return (generation // self.flip_interval) % self.num_skills

    def ask(self, generation: int) -> Ask:
        expected = (self._asked[-1] + 1) if self._asked else None
        if expected is not None and generation != expected:
            raise RuntimeError(f"ask({generation}) out of order: expected ask({expected})")
        k = self.quality_skill(generation)
        rng = np.random.default_rng(derive_seed(self.seed, generation, "sampling"))
        parents = sample_parents(self.archives[k], rng, n=self.num_parents, scheme=self.sampling)
        self._asked.append(generation)
        return Ask(generation, k, tuple(p.id for p in parents), self.basis_skill(generation),
                   tuple(self.archives[k].cell_of(p.scores) for p in parents))

    def tell(self, generation: int, child: Elite | None) -> list[str]:
        """Offer ``child`` to every archive; returns the quality skills of those it entered.
        ``child=None`` (a rejected child: non-finite weights or scores) answers the ask and
        offers nothing."""
        if not self._asked or self._asked[0] != generation:
            raise RuntimeError(f"tell({generation}) without a matching outstanding ask "
                               f"(outstanding: {self._asked})")
        self._asked.pop(0)
        self._last_told = generation
        if child is None:
            return []
        return [a.quality_skill for a in self.archives if a.add(child)]

    def tell_seed(self, elite: Elite) -> list[str]:
        """Offer a scored seed model (an expert, or the base) to every archive; returns the
        quality skills of those it entered.

        Raises:
            RuntimeError: a generation was already asked.
        """
        if self._asked or self._last_told is not None:
            raise RuntimeError(f"tell_seed({elite.id!r}) after generation asks began")
        return [a.quality_skill for a in self.archives if a.add(elite)]

    def seed_archives(self, elites: Sequence[Elite]) -> None:
        """Insert the seed models (experts, optionally the base) into every archive."""
        for e in elites:
            self.tell_seed(e)

    def reset_pending(self, next_generation: int) -> None:
        """Forget outstanding asks (after a resume, generation ``next_generation`` comes next)."""
        self._asked = []
        self._last_told = next_generation - 1
