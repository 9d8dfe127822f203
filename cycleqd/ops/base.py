"""Task vectors and operator protocols (the operator registries: :mod:`cycleqd.registry`).

A task vector (Ilharco et al., 2023) is ``tau = theta_expert - theta_base`` per tensor.
Operators take and return ``TaskVector = dict[str, Tensor]`` (fp32, same names/shapes as
the base) and draw all randomness from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence, runtime_checkable

from cycleqd._lazy import lazy_import
# CROSSOVERS, MUTATIONS: re-exported (``from cycleqd.ops.base import CROSSOVERS`` still works)
from cycleqd.registry import CROSSOVERS, MUTATIONS, Registry  # noqa: F401

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")

TaskVector = dict[str, "torch.Tensor"]


@runtime_checkable
class Crossover(Protocol):
    """Merge K parent task vectors into one child task vector.

    Args:
        parents: K >= 1 task vectors with identical keys and shapes, fp32.
        generator: the only source of randomness.
    Returns:
        The child's task vector (same keys/shapes, fp32).
    """

    def __call__(self, parents: Sequence[TaskVector], *, generator: torch.Generator) -> TaskVector: ...


@runtime_checkable
class Mutation(Protocol):
    """Perturb a child's task vector.

    Args:
        child: the task vector to mutate (not modified in place).
        skill: index of the current quality skill (SVD mutation uses that expert's basis).
        generator: the only source of randomness.
    """

    def __call__(self, child: TaskVector, *, skill: int, generator: torch.Generator) -> TaskVector: ...


def register(registry: Registry, name: str, *, source: str, **kw):
    """Decorator: ``registry.register(name, source=..., **kw)`` (see
    :meth:`cycleqd.registry.Registry.register`); kept for the ``cycleqd.register`` API."""
    return registry.register(name, source=source, **kw)


def task_vector(model: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> TaskVector:
    """tau = model - base per tensor, computed in fp32. Keys must match (else KeyError)."""
    missing = set(base) ^ set(model)
    if missing:
        raise KeyError(f"task vector: tensors differ between model and base: {sorted(missing)[:5]}")
    return {k: model[k].float() - base[k].float() for k in base}


def apply_task_vector(base: Mapping[str, torch.Tensor], tau: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """theta = base + tau per tensor, arithmetic in fp32, result cast to the base's dtype."""
    return {k: (v.float() + tau[k]).to(v.dtype) if k in tau else v for k, v in base.items()}


def is_matrix(name: str, t: torch.Tensor) -> bool:
    """True for 2-D weight matrices that SVD mutation touches (norms/biases/1-D skipped).

    Follows the official CycleQD mutation, which skips every tensor whose name contains
    ``"norm"``; embeddings and ``lm_head`` (2-D) are included."""
    return t.ndim == 2 and "norm" not in name.lower()


class TensorSelector:
    r"""Chooses which tensors an operator touches, by name regex and shape.

    A tensor is selected when it is 2-D (``matrices_only``) and not a norm, its name
    matches at least one ``include`` regex (``re.search``; ``None`` = all) and none of the
    ``exclude`` regexes.

    Args:
        include: regexes, e.g. ``[r"self_attn\.", r"mlp\."]``.
        exclude: regexes, e.g. ``[r"embed_tokens", r"lm_head"]`` (saves SVD memory on
            large-vocabulary models).
        matrices_only: restrict to 2-D non-norm tensors (default, as the official code).
    Raises:
        ValueError: a pattern is not a valid regex.
    """

    def __init__(self, include: Sequence[str] | str | None = None,
                 exclude: Sequence[str] | str | None = None, *, matrices_only: bool = True):
        import re

        def compile_all(pats, field):
            if pats is None:
                return None
            if isinstance(pats, str):
                pats = [pats]
            out = []
            for p in pats:
                try:
                    out.append(re.compile(p))
                except re.error as e:
                    raise ValueError(f"{field}: invalid regex {p!r}: {e}") from e
            return out

        self.include = compile_all(include, "include")
        self.exclude = compile_all(exclude, "exclude") or []
        self.matrices_only = matrices_only

    def __call__(self, name: str, shape: Sequence[int] | torch.Size) -> bool:
        if self.matrices_only and (len(shape) != 2 or "norm" in name.lower()):
            return False
        if self.include is not None and not any(p.search(name) for p in self.include):
            return False
        return not any(p.search(name) for p in self.exclude)

    def describe(self) -> str:
        """A stable string for cache keys."""
        inc = [p.pattern for p in self.include] if self.include is not None else None
        return repr((inc, [p.pattern for p in self.exclude], self.matrices_only))


def with_params(op: Any, params: Mapping[str, float] | None) -> Any:
    """``op`` with some numeric settings replaced for one call (e.g. the CMA-ES policy's
    per-child ``mu``/``sigma``/``rate``, :mod:`cycleqd.qd.cma`): a shallow copy (caches
    such as SVD bases stay shared), or ``op`` itself when ``params`` is empty. Values are
    set as given, unvalidated (the official CMA outputs may be negative).

    Raises:
        ValueError: ``op`` has no attribute of that name.
    """
    if not params:
        return op
    missing = [k for k in params if not hasattr(op, k)]
    if missing:
        raise ValueError(f"operator {type(op).__name__} has no setting {missing[0]!r} to override")
    new = copy.copy(op)
    for k, v in params.items():
        setattr(new, k, float(v))
    return new
