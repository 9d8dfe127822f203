"""Mutation operators over task vectors.

* ``svd_expert`` -- the official CycleQD mutation (``SVDUniformMutator``, paper §3.3): for
  every selected weight matrix ``W`` (2-D, name without ``"norm"``; embeddings and
  ``lm_head`` included, as in the official code), with ``U S V^T`` the SVD of the *quality
  skill's expert* task vector ``tau_q[W]`` (computed once per expert and cached on disk),
  ``tau'[W] = tau[W] + U diag(s * r) V^T`` with ``r ~ U(0, rate)`` drawn per singular value
  (official ``mutation_rate = 0.1``). Optional rank truncation keeps the top-``rank``
  directions (factors of a 4096x4096 matrix at full rank take 2x the matrix's memory; at
  ``rank=256`` they take 1/8).
* ``svd_self`` -- the paper text's variant: the SVD of the *child's own* task vector, its
  singular values rescaled by ``(1 + r)``: ``tau' = U diag(s * (1 + r)) V^T = tau + U diag(s * r) V^T``
  (an SVD per child: ~14 s for SmolLM2-135M on 2 cores).
* ``gaussian`` -- the ablation (official ``GaussianMutator``): ``tau' = tau + N(0, std^2)``
  on every tensor (official ``mutation_rate = 0.0003``), or only on matrices.
* ``none`` -- identity.

Randomness only from the explicit ``torch.Generator``; the draws are made in the child's
key order, one ``torch.rand(len(s))`` per selected matrix, so :mod:`cycleqd.ops.genome`
reproduces the very same ``r`` vectors.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from cycleqd.ops.base import MUTATIONS, TaskVector, TensorSelector, register

SVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # U (m, r), S (r,), Vh (r, n), fp32


def svd_matrix(t: torch.Tensor, rank: int | None = None) -> SVD:
    """Thin SVD of a 2-D tensor in fp32 (``torch.linalg.svd``, ``full_matrices=False``),
    optionally truncated to the top ``rank`` singular directions.

    Returns ``U`` (m, r), ``S`` (r,), ``Vh`` (r, n), contiguous fp32, with
    ``r = min(m, n, rank)``.
    """
    U, S, Vh = torch.linalg.svd(t.float(), full_matrices=False)
    if rank is not None and rank < S.numel():
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    return U.contiguous(), S.contiguous(), Vh.contiguous()


def svd_of(tau: Mapping[str, torch.Tensor], *, rank: int | None = None,
           select: TensorSelector | None = None) -> dict[str, SVD]:
    """SVD of every selected matrix of ``tau`` (default: 2-D non-norm), in ``tau``'s order."""
    select = select or TensorSelector()
    return {k: svd_matrix(t, rank) for k, t in tau.items() if select(k, t.shape)}


def tensor_fingerprint(tau: Mapping[str, torch.Tensor], select: TensorSelector | None = None) -> str:
    """blake2b-128 over names, shapes and bytes of the selected tensors (reads them all:
    ~1 s per GB). Used as the SVD cache key when the loader gave no cheaper fingerprint."""
    select = select or TensorSelector()
    h = hashlib.blake2b(digest_size=16)
    for k, t in tau.items():
        if select(k, t.shape):
            h.update(k.encode())
            h.update(repr(tuple(t.shape)).encode())
            h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


class SVDCache:
    """Expert task-vector SVDs on disk: one safetensors file per (expert, rank, selection).

    File: ``<root>/<fingerprint>-<rank|full>-<selection hash>.safetensors`` with tensors
    ``"<name>.U"`` (m, r), ``"<name>.S"`` (r,), ``"<name>.Vh"`` (r, n), fp32, written
    atomically (temp file + rename), so a crash never leaves a truncated cache entry.
    ``root=None`` keeps everything in memory only.
    """

    def __init__(self, root: Path | str | None):
        self.root = Path(root) if root is not None else None

    def path(self, fingerprint: str, rank: int | None, select: TensorSelector) -> Path | None:
        if self.root is None:
            return None
        sel = hashlib.blake2b(select.describe().encode(), digest_size=6).hexdigest()
        return self.root / f"{fingerprint}-{rank if rank else 'full'}-{sel}.safetensors"

    def get(self, tau: Mapping[str, torch.Tensor], *, fingerprint: str | None,
            rank: int | None, select: TensorSelector) -> dict[str, SVD]:
        """Load the SVDs from disk, or compute them (and store them) once."""
        from safetensors.torch import load_file, save_file

        if self.root is None:
            return svd_of(tau, rank=rank, select=select)
        fp = fingerprint or tensor_fingerprint(tau, select)
        path = self.path(fp, rank, select)
        if path.is_file():
            flat = load_file(str(path))
            names = [k for k, t in tau.items() if select(k, t.shape)]
            missing = [n for n in names if f"{n}.U" not in flat]
            if not missing:
                return {n: (flat[f"{n}.U"], flat[f"{n}.S"], flat[f"{n}.Vh"]) for n in names}
        bases = svd_of(tau, rank=rank, select=select)
        flat = {}
        for n, (U, S, Vh) in bases.items():
            flat[f"{n}.U"], flat[f"{n}.S"], flat[f"{n}.Vh"] = U, S, Vh
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        save_file(flat, str(tmp), metadata={"rank": str(rank), "select": select.describe()})
        os.replace(tmp, path)
        return bases


def svd_perturbation(basis: SVD, r: torch.Tensor) -> torch.Tensor:
    """``U diag(s * r) V^T``: shape (m, n), fp32. ``r``: (len(s),)."""
    U, S, Vh = basis
    return (U * (S * r)) @ Vh


class SVDExpertMutation:
    """Official CycleQD SVD mutation in the quality skill's expert basis.

    Args:
        experts: the K experts' task vectors in skill order (name -> (shape) tensor; may be
            lazy mappings). Only read to compute (or fingerprint) the SVDs.
        rate: ``r ~ U(0, rate)`` per singular value (official 0.1).
        rank: keep the top ``rank`` singular directions (``None`` = full; exactness of the
            compact genomes does not depend on it, see :mod:`cycleqd.ops.genome`).
        include, exclude: regexes choosing the matrices (see :class:`TensorSelector`).
        cache_dir: where the SVDs are cached (``None`` = memory only).
        fingerprints: one cache key per expert (e.g. from the loader: source paths, sizes,
            mtimes); ``None`` hashes the tensors' bytes.
        bases: precomputed SVDs per skill (skips the cache).
    Raises:
        ValueError: ``rate`` < 0, ``rank`` < 1, or a skill index out of range (at call).
    """

    def __init__(self, experts: Sequence[Mapping[str, torch.Tensor]] = (), rate: float = 0.1,
                 rank: int | None = None, include: Sequence[str] | str | None = None,
                 exclude: Sequence[str] | str | None = None, cache_dir: Path | str | None = None,
                 fingerprints: Sequence[str | None] | None = None,
                 bases: Sequence[dict[str, SVD]] | None = None):
        if rate < 0:
            raise ValueError(f"svd_expert.rate={rate}: must be >= 0")
        if rank is not None and int(rank) < 1:
            raise ValueError(f"svd_expert.rank={rank}: must be >= 1 or None")
        self.experts = list(experts)
        self.rate, self.rank = float(rate), (int(rank) if rank is not None else None)
        self.select = TensorSelector(include, exclude)
        self.cache = SVDCache(cache_dir)
        self.fingerprints = list(fingerprints) if fingerprints is not None else [None] * len(self.experts)
        self.bases: dict[int, dict[str, SVD]] = dict(enumerate(bases)) if bases is not None else {}

    def basis(self, skill: int) -> dict[str, SVD]:
        """The (cached) SVDs of expert ``skill``'s task vector: name -> (U, S, Vh)."""
        if skill not in self.bases:
            if not 0 <= skill < len(self.experts):
                raise ValueError(f"svd_expert: skill {skill} out of range (have "
                                 f"{len(self.experts)} experts)")
            self.bases[skill] = self.cache.get(self.experts[skill], fingerprint=self.fingerprints[skill],
                                               rank=self.rank, select=self.select)
        return self.bases[skill]

    def draw(self, names: Iterable[str], skill: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw ``r ~ U(0, rate)`` for each basis matrix among ``names``, in that order.
        Returns name -> (r_name,) fp32."""
        basis = self.basis(skill)
        return {k: torch.rand(basis[k][1].shape, generator=generator, dtype=torch.float32) * self.rate
                for k in names if k in basis}

    def __call__(self, child: TaskVector, *, skill: int, generator: torch.Generator) -> TaskVector:
        basis = self.basis(skill)
        rs = self.draw(child.keys(), skill, generator)
        return {k: (v + svd_perturbation(basis[k], rs[k])) if k in rs else v for k, v in child.items()}


@register(MUTATIONS, "svd_expert")
def svd_expert(experts: Sequence[Mapping[str, torch.Tensor]] = (), rate: float = 0.1,
               rank: int | None = None, bases: Sequence[dict[str, SVD]] | None = None,
               include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None,
               cache_dir: Path | str | None = None,
               fingerprints: Sequence[str | None] | None = None) -> SVDExpertMutation:
    """Official SVD mutation in the quality skill's expert basis (see :class:`SVDExpertMutation`)."""
    return SVDExpertMutation(experts, rate=rate, rank=rank, include=include, exclude=exclude,
                             cache_dir=cache_dir, fingerprints=fingerprints, bases=bases)


class SVDSelfMutation:
    """The paper text's SVD mutation: SVD of the child's own task vector per selected
    matrix, ``tau' = tau + U diag(s * r) V^T``, ``r ~ U(0, rate)``."""

    def __init__(self, rate: float = 0.1, rank: int | None = None,
                 include: Sequence[str] | str | None = None,
                 exclude: Sequence[str] | str | None = None):
        if rate < 0:
            raise ValueError(f"svd_self.rate={rate}: must be >= 0")
        self.rate, self.rank = float(rate), rank
        self.select = TensorSelector(include, exclude)

    def __call__(self, child: TaskVector, *, skill: int, generator: torch.Generator) -> TaskVector:
        out = {}
        for k, v in child.items():
            if self.select(k, v.shape):
                basis = svd_matrix(v, self.rank)
                r = torch.rand(basis[1].shape, generator=generator, dtype=torch.float32) * self.rate
                out[k] = v + svd_perturbation(basis, r)
            else:
                out[k] = v
        return out


@register(MUTATIONS, "svd_self")
def svd_self(experts: Sequence[Mapping[str, torch.Tensor]] = (), rate: float = 0.1,
             rank: int | None = None, include: Sequence[str] | str | None = None,
             exclude: Sequence[str] | str | None = None) -> SVDSelfMutation:
    """Paper-text SVD mutation (child's own SVD); ``experts`` is accepted and unused."""
    return SVDSelfMutation(rate=rate, rank=rank, include=include, exclude=exclude)


class GaussianMutation:
    """``tau' = tau + N(0, std^2)`` on every tensor (official ablation) or matrices only."""

    def __init__(self, std: float = 0.0003, matrices_only: bool = False):
        if std < 0:
            raise ValueError(f"gaussian.std={std}: must be >= 0")
        self.std, self.matrices_only = float(std), bool(matrices_only)
        self.select = TensorSelector(matrices_only=matrices_only)

    def __call__(self, child: TaskVector, *, skill: int, generator: torch.Generator) -> TaskVector:
        return {k: (v + torch.randn(v.shape, generator=generator, dtype=torch.float32) * self.std)
                if self.select(k, v.shape) else v for k, v in child.items()}


@register(MUTATIONS, "gaussian")
def gaussian(experts: Sequence[Mapping[str, torch.Tensor]] = (), std: float = 0.0003,
             matrices_only: bool = False) -> GaussianMutation:
    """Gaussian-noise ablation (official ``GaussianMutator``, ``mutation_rate=0.0003``)."""
    return GaussianMutation(std=std, matrices_only=matrices_only)


class NoMutation:
    """Identity (ablation)."""

    def __call__(self, child: TaskVector, *, skill: int, generator: torch.Generator) -> TaskVector:
        return child


@register(MUTATIONS, "none")
def none(experts: Sequence[Mapping[str, torch.Tensor]] = ()) -> NoMutation:
    """No mutation (ablation)."""
    return NoMutation()


def make_mutation(spec: Mapping | str, *, experts: Sequence[Mapping[str, torch.Tensor]] = (),
                  cache_dir: Path | str | None = None,
                  fingerprints: Sequence[str | None] | None = None):
    """Build a mutation from ``{"name": ..., **kwargs}`` (or a bare name).

    ``experts``/``cache_dir``/``fingerprints`` are passed to operators that take them.

    Raises:
        ValueError: unknown name (known names listed) or bad parameters.
    """
    import inspect

    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = spec.pop("name", None)
    if name not in MUTATIONS:
        raise ValueError(f"mutation.name={name!r}: expected one of {sorted(MUTATIONS)}")
    factory = MUTATIONS[name]
    params = inspect.signature(factory).parameters
    extra = {"experts": experts, "cache_dir": cache_dir, "fingerprints": fingerprints}
    for k, v in extra.items():
        if k in params and k not in spec and v is not None:
            spec[k] = v
    try:
        return factory(**spec)
    except TypeError as e:
        raise ValueError(f"mutation {name!r}: bad parameters {sorted(spec)}: {e}") from e
