"""Mutation operators.

``svd_expert`` is the official CycleQD mutation (paper §3.3, official code): for each
weight matrix, with ``U S V^T`` the SVD of the *quality skill's expert* task vector
(computed once, cached), add ``U diag(s * r) V^T`` with ``r ~ U(0, rate)`` drawn per
singular value. ``gaussian`` (the paper's ablation) adds ``N(0, std)`` noise.
"""

from __future__ import annotations

from typing import Sequence

import torch

from cycleqd.ops.base import MUTATIONS, TaskVector, is_matrix, register

SVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # U (m, r), S (r,), Vh (r, n)


def svd_of(tau: TaskVector, *, rank: int | None = None) -> dict[str, SVD]:
    """Thin SVD of every 2-D non-norm matrix of ``tau`` (fp32), optionally truncated to ``rank``."""
    out: dict[str, SVD] = {}
    for k, t in tau.items():
        if is_matrix(k, t):
            U, S, Vh = torch.linalg.svd(t.float(), full_matrices=False)
            if rank is not None:
                U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
            out[k] = (U.contiguous(), S.contiguous(), Vh.contiguous())
    return out


def svd_perturbation(basis: SVD, rate: float, generator: torch.Generator) -> torch.Tensor:
    """U diag(s * r) V^T with r ~ U(0, rate) per singular value. Shape (m, n), fp32."""
    U, S, Vh = basis
    r = torch.rand(S.shape, generator=generator, dtype=torch.float32) * rate
    return (U * (S * r)) @ Vh


@register(MUTATIONS, "svd_expert")
def svd_expert(experts: Sequence[TaskVector], rate: float = 0.1, rank: int | None = None,
               bases: Sequence[dict[str, SVD]] | None = None):
    """Official SVD mutation in the quality skill's expert basis.

    Args:
        experts: the K experts' task vectors, in skill order.
        rate: upper bound of r ~ U(0, rate) (official 0.1).
        rank: keep only the top-``rank`` singular directions (memory for 8B models).
        bases: precomputed ``svd_of(expert)`` per skill (e.g. loaded from the disk cache).
    """
    cache: dict[int, dict[str, SVD]] = dict(enumerate(bases)) if bases is not None else {}

    def mutate(child: TaskVector, *, skill: int, generator: torch.Generator) -> TaskVector:
        if skill not in cache:
            cache[skill] = svd_of(experts[skill], rank=rank)
        basis = cache[skill]
        return {k: (v + svd_perturbation(basis[k], rate, generator)) if k in basis else v
                for k, v in child.items()}

    mutate.bases = cache  # type: ignore[attr-defined]
    return mutate


@register(MUTATIONS, "svd_self")
def svd_self(experts: Sequence[TaskVector] = (), rate: float = 0.1, rank: int | None = None):
    """The paper text's variant: SVD of the *child's own* task vector per matrix, singular
    values rescaled by (1 + r), r ~ U(0, rate): tau' = tau + U diag(s * r) V^T."""

    def mutate(child: TaskVector, *, skill: int, generator: torch.Generator) -> TaskVector:
        bases = svd_of(child, rank=rank)
        return {k: (v + svd_perturbation(bases[k], rate, generator)) if k in bases else v
                for k, v in child.items()}

    return mutate


@register(MUTATIONS, "gaussian")
def gaussian(experts: Sequence[TaskVector] = (), std: float = 0.001, matrices_only: bool = True):
    """Ablation: tau' = tau + N(0, std^2) on every matrix (or every tensor)."""

    def mutate(child: TaskVector, *, skill: int, generator: torch.Generator) -> TaskVector:
        return {k: (v + torch.randn(v.shape, generator=generator) * std)
                if (is_matrix(k, v) or not matrices_only) else v for k, v in child.items()}

    return mutate


@register(MUTATIONS, "none")
def none(experts: Sequence[TaskVector] = ()):
    """No mutation (ablation)."""

    def mutate(child: TaskVector, *, skill: int, generator: torch.Generator) -> TaskVector:
        return child

    return mutate
