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
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from cycleqd._lazy import lazy_import
from cycleqd.ops.base import TaskVector, TensorSelector
from cycleqd.registry import MUTATIONS

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")

SVD = tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]  # U (m, r), S (r,), Vh (r, n), fp32


def _nonneg(value, field: str) -> float:
    """``float(value)`` if it is a finite number >= 0, else ValueError naming ``field``."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field}={value!r}: must be a number") from None
    if not math.isfinite(x):
        raise ValueError(f"{field}={value!r}: must be a finite number")
    if x < 0:
        raise ValueError(f"{field}={value!r}: must be >= 0")
    return x


def svd_matrix(t: torch.Tensor, rank: int | None = None, method: str = "exact") -> SVD:
    """Thin SVD of a 2-D tensor in fp32, optionally truncated to the top ``rank`` directions.

    ``method="exact"``: a full thin SVD (official; see :func:`_thin_svd`). ``"lowrank"``
    (needs ``rank``): randomized SVD (:func:`_randomized_svd`) with ``q = rank + 8`` and 4
    power iterations, O(m n q) instead of O(m n min(m, n)) -- approximate top directions, much
    faster for large models (the compact genomes stay exact either way: they store
    whatever basis the mutation used). The randomized sketch uses a fixed seed, so the
    basis is reproducible.

    Returns ``U`` (m, r), ``S`` (r,), ``Vh`` (r, n), contiguous fp32, ``r = min(m, n, rank)``.
    """
    if method == "lowrank" and rank is not None and rank < min(t.shape):
        U, S, Vh = _randomized_svd(t.float(), q=min(rank + 8, min(t.shape)), niter=4)
        return U[:, :rank].contiguous(), S[:rank].contiguous(), Vh[:rank].contiguous()
    if method not in ("exact", "lowrank"):
        raise ValueError(f"svd method {method!r}: expected 'exact' or 'lowrank'")
    U, S, Vh = _thin_svd(t.float())
    if rank is not None and rank < S.numel():
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    return U.contiguous(), S.contiguous(), Vh.contiguous()


def _thin_svd(a: torch.Tensor) -> SVD:
    """Thin SVD; for non-square matrices via QR first (``A = QR``, ``R = U_R S V^T``,
    ``U = Q U_R``), which is mathematically the same factorisation. Reason: MKL's
    ``gesdd`` (torch's CPU LAPACK) is pathologically slow on tall/wide matrices on AMD
    CPUs -- 21 s for one 1536x576 matrix vs 0.6 s through QR (measured on this project's
    2-core EPYC machines); SmolLM2's 211 matrices went from minutes to ~14 s."""
    m, n = a.shape
    if m == n or a.device.type != "cpu":
        return torch.linalg.svd(a, full_matrices=False)
    tall = m > n
    q, r = torch.linalg.qr(a if tall else a.T)
    ur, s, vh = torch.linalg.svd(r)
    u = q @ ur
    return (u, s, vh) if tall else (vh.T, s, u.T)


def _randomized_svd(a: torch.Tensor, q: int, niter: int) -> SVD:
    """Halko-Martinsson-Tropp randomized SVD with ``niter`` QR-stabilised power iterations;
    the sketch comes from ``torch.Generator(0)`` (reproducible, global RNG untouched)."""
    g = torch.Generator().manual_seed(0)
    omega = torch.randn(a.shape[1], q, generator=g, dtype=a.dtype)
    Q, _ = torch.linalg.qr(a @ omega)
    for _ in range(niter):
        Z, _ = torch.linalg.qr(a.T @ Q)
        Q, _ = torch.linalg.qr(a @ Z)
    ub, s, vh = _thin_svd(Q.T @ a)
    return Q @ ub, s, vh


def svd_of(tau: Mapping[str, torch.Tensor], *, rank: int | None = None,
           select: TensorSelector | None = None, method: str = "exact") -> dict[str, SVD]:
    """SVD of every selected matrix of ``tau`` (default: 2-D non-norm), in ``tau``'s order."""
    select = select or TensorSelector()
    return {k: svd_matrix(t, rank, method) for k, t in tau.items() if select(k, t.shape)}


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

    def path(self, fingerprint: str, rank: int | None, select: TensorSelector,
             method: str = "exact") -> Path | None:
        if self.root is None:
            return None
        sel = hashlib.blake2b(select.describe().encode(), digest_size=6).hexdigest()
        r = f"{rank}" if rank else "full"
        if method != "exact" and rank:
            r += f"{method}"
        return self.root / f"{fingerprint}-{r}-{sel}.safetensors"

    def get(self, tau: Mapping[str, torch.Tensor], *, fingerprint: str | None,
            rank: int | None, select: TensorSelector, method: str = "exact") -> dict[str, SVD]:
        """Load the SVDs from disk, or compute them (and store them) once."""
        from safetensors.torch import load_file, save_file

        if self.root is None:
            return svd_of(tau, rank=rank, select=select, method=method)
        fp = fingerprint or tensor_fingerprint(tau, select)
        path = self.path(fp, rank, select, method)
        if path.is_file():
            flat = load_file(str(path))
            names = [k for k, t in tau.items() if select(k, t.shape)]
            missing = [n for n in names if f"{n}.U" not in flat]
            if not missing:
                return {n: (flat[f"{n}.U"], flat[f"{n}.S"], flat[f"{n}.Vh"]) for n in names}
        full = self.path(fp, None, select) if (rank and method == "exact") else None
        if full is not None and full.is_file():  # truncate the cached full-rank SVD
            flat = load_file(str(full))
            names = [k for k, t in tau.items() if select(k, t.shape)]
            if all(f"{n}.U" in flat for n in names):
                return {n: (flat[f"{n}.U"][:, :rank].contiguous(), flat[f"{n}.S"][:rank].contiguous(),
                            flat[f"{n}.Vh"][:rank].contiguous()) for n in names}
        bases = svd_of(tau, rank=rank, select=select, method=method)
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


def add_svd_perturbation(out: torch.Tensor, basis: SVD, r: torch.Tensor) -> torch.Tensor:
    """``out += U diag(s * r) V^T`` in place (one fused ``addmm_``, no (m, n) temporary)."""
    U, S, Vh = basis
    k = min(S.numel(), r.numel())
    if k:
        out.addmm_(U[:, :k] * (S[:k] * r[:k]), Vh[:k])
    return out


def effective_rank(S: torch.Tensor, tol: float) -> int:
    """Number of singular values above ``tol * max(S)`` (``S`` sorted descending)."""
    if S.numel() == 0 or tol <= 0:
        return int(S.numel())
    smax = float(S[0])
    if smax <= 0:
        return 0
    return int((S > tol * smax).sum())


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
        svd_method: ``exact`` (official) or ``lowrank`` (randomized, needs ``rank``; see
            :func:`svd_matrix`).
        fingerprints: one cache key per expert (e.g. from the loader: source paths, sizes,
            mtimes); ``None`` hashes the tensors' bytes.
        bases: precomputed SVDs per skill (skips the cache).
        svd_tol: directions with ``s <= svd_tol * max(s)`` are dropped from the product
            (default 1e-6: their share of the perturbation, ``<= 0.1 * 1e-6 * max(s)``, is
            below fp32 resolution; 0 keeps all). A LoRA expert's task vector has numerical
            rank = its LoRA rank, so the mutation costs O(m n r_LoRA) instead of
            O(m n min(m, n)). ``r`` is still drawn for every singular value, so the random
            stream does not depend on the tolerance.
    Raises:
        ValueError: ``rate`` < 0, ``rank`` < 1, or a skill index out of range (at call).
    """

    name = "svd_expert"

    def __init__(self, experts: Sequence[Mapping[str, torch.Tensor]] = (), rate: float = 0.1,
                 rank: int | None = None, include: Sequence[str] | str | None = None,
                 exclude: Sequence[str] | str | None = None, cache_dir: Path | str | None = None,
                 fingerprints: Sequence[str | None] | None = None,
                 bases: Sequence[dict[str, SVD]] | None = None, svd_method: str = "exact",
                 svd_tol: float = 1e-6):
        self.svd_tol = _nonneg(svd_tol, "svd_expert.svd_tol")
        self._ndraw: dict[int, dict[str, int]] = {}
        rate = _nonneg(rate, "svd_expert.rate")
        if rank is not None and int(rank) < 1:
            raise ValueError(f"svd_expert.rank={rank}: must be >= 1 or None")
        if svd_method not in ("exact", "lowrank"):
            raise ValueError(f"svd_expert.svd_method={svd_method!r}: expected 'exact' or 'lowrank'")
        if svd_method == "lowrank" and rank is None:
            raise ValueError("svd_expert.svd_method='lowrank' needs a rank")
        self.svd_method = svd_method
        self.experts = list(experts)
        self.rate, self.rank = float(rate), (int(rank) if rank is not None else None)
        self.select = TensorSelector(include, exclude)
        self.cache = SVDCache(cache_dir)
        self.fingerprints = list(fingerprints) if fingerprints is not None else [None] * len(self.experts)
        self.bases: dict[int, dict[str, SVD]] = {}
        for k, b in (enumerate(bases) if bases is not None else ()):
            self._set_basis(k, b)

    def _set_basis(self, skill: int, full: dict[str, SVD]) -> None:
        kept, nd = {}, {}
        for name, (U, S, Vh) in full.items():
            k = effective_rank(S, self.svd_tol)
            kept[name] = (U[:, :k].contiguous(), S[:k].contiguous(), Vh[:k].contiguous())
            nd[name] = int(S.numel())
        self.bases[skill], self._ndraw[skill] = kept, nd

    def basis(self, skill: int) -> dict[str, SVD]:
        """The (cached) SVDs of expert ``skill``'s task vector: name -> (U (m, k), S (k,),
        Vh (k, n)), the directions above ``svd_tol`` only."""
        if skill not in self.bases:
            if not 0 <= skill < len(self.experts):
                raise ValueError(f"svd_expert: skill {skill} out of range (have "
                                 f"{len(self.experts)} experts)")
            self._set_basis(skill, self.cache.get(
                self.experts[skill], fingerprint=self.fingerprints[skill], rank=self.rank,
                select=self.select, method=self.svd_method))
        return self.bases[skill]

    def draw(self, names: Iterable[str], skill: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw ``r ~ U(0, rate)`` (one per singular value of the SVD, kept or not) for each
        basis matrix among ``names``, in that order. Returns name -> (k_name,) fp32, the
        entries of the kept directions."""
        basis = self.basis(skill)
        nd = self._ndraw[skill]
        return {k: (torch.rand(nd[k], generator=generator, dtype=torch.float32) * self.rate)[: basis[k][1].numel()]
                for k in names if k in basis}

    def __call__(self, child: TaskVector, *, skill: int, generator: torch.Generator) -> TaskVector:
        basis = self.basis(skill)
        rs = self.draw(child.keys(), skill, generator)
        return {k: add_svd_perturbation(v.clone(), basis[k], rs[k]) if k in rs else v
                for k, v in child.items()}


_CONTEXT = ("experts", "cache_dir", "fingerprints", "bases")


@MUTATIONS.register("svd_expert", source="CycleQD paper §3.3; official code SVDUniformMutator "
                    "(SakanaAI/CycleQD)", svd_genome=True, context=_CONTEXT)
def svd_expert(experts: Sequence[Mapping[str, torch.Tensor]] = (), rate: float = 0.1,
               rank: int | None = None, bases: Sequence[dict[str, SVD]] | None = None,
               include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None,
               cache_dir: Path | str | None = None,
               fingerprints: Sequence[str | None] | None = None,
               svd_method: str = "exact", svd_tol: float = 1e-6) -> SVDExpertMutation:
    """Official SVD mutation in the quality skill's expert basis (see :class:`SVDExpertMutation`)."""
    return SVDExpertMutation(experts, rate=rate, rank=rank, include=include, exclude=exclude,
                             cache_dir=cache_dir, fingerprints=fingerprints, bases=bases,
                             svd_method=svd_method, svd_tol=svd_tol)


class SVDSelfMutation:
    """The paper text's SVD mutation: SVD of the child's own task vector per selected
    matrix, ``tau' = tau + U diag(s * r) V^T``, ``r ~ U(0, rate)``."""

    name = "svd_self"

    def __init__(self, rate: float = 0.1, rank: int | None = None,
                 include: Sequence[str] | str | None = None,
                 exclude: Sequence[str] | str | None = None):
        self.rate, self.rank = _nonneg(rate, "svd_self.rate"), rank
        if rank is not None and int(rank) < 1:
            raise ValueError(f"svd_self.rank={rank!r}: must be >= 1 or None")
        self.select = TensorSelector(include, exclude)

    def __call__(self, child: TaskVector, *, skill: int, generator: torch.Generator) -> TaskVector:
        out = {}
        for k, v in child.items():
            if self.select(k, v.shape):
                basis = svd_matrix(v, self.rank)
                r = torch.rand(basis[1].shape, generator=generator, dtype=torch.float32) * self.rate
                out[k] = add_svd_perturbation(v.float().clone(), basis, r)
            else:
                out[k] = v
        return out


@MUTATIONS.register("svd_self", source="CycleQD paper §3.3 (text: SVD of the child's own task "
                    "vector)", context=_CONTEXT)
def svd_self(experts: Sequence[Mapping[str, torch.Tensor]] = (), rate: float = 0.1,
             rank: int | None = None, include: Sequence[str] | str | None = None,
             exclude: Sequence[str] | str | None = None) -> SVDSelfMutation:
    """Paper-text SVD mutation (child's own SVD); ``experts`` is accepted and unused."""
    return SVDSelfMutation(rate=rate, rank=rank, include=include, exclude=exclude)


class GaussianMutation:
    """``tau' = tau + N(0, std^2)`` on every tensor (official ablation) or matrices only."""

    name = "gaussian"

    def __init__(self, std: float = 0.0003, matrices_only: bool = False):
        self.std, self.matrices_only = _nonneg(std, "gaussian.std"), bool(matrices_only)
        self.select = TensorSelector(matrices_only=matrices_only)

    def __call__(self, child: TaskVector, *, skill: int, generator: torch.Generator) -> TaskVector:
        return {k: (v + torch.randn(v.shape, generator=generator, dtype=torch.float32) * self.std)
                if self.select(k, v.shape) else v for k, v in child.items()}


@MUTATIONS.register("gaussian", source="CycleQD paper §4 ablation; official code GaussianMutator",
                    context=_CONTEXT)
def gaussian(experts: Sequence[Mapping[str, torch.Tensor]] = (), std: float = 0.0003,
             matrices_only: bool = False) -> GaussianMutation:
    """Gaussian-noise ablation (official ``GaussianMutator``, ``mutation_rate=0.0003``)."""
    return GaussianMutation(std=std, matrices_only=matrices_only)


class NoMutation:
    """Identity (ablation)."""

    name = "none"

    def __call__(self, child: TaskVector, *, skill: int, generator: torch.Generator) -> TaskVector:
        return child


@MUTATIONS.register("none", source="CycleQD paper §4 ablation (no mutation)", svd_genome=True,
                    context=_CONTEXT)
def none(experts: Sequence[Mapping[str, torch.Tensor]] = ()) -> NoMutation:
    """No mutation (ablation)."""
    return NoMutation()


def make_mutation(spec: Mapping | str, *, experts: Sequence[Mapping[str, torch.Tensor]] = (),
                  cache_dir: Path | str | None = None,
                  fingerprints: Sequence[str | None] | None = None, field: str | None = None):
    """Build a mutation from ``{"name": ..., **kwargs}`` (or a bare name) through
    :data:`cycleqd.registry.MUTATIONS`.

    ``experts``/``cache_dir``/``fingerprints`` are passed to operators that take them;
    ``field`` is the config path named in errors (e.g. ``operators.mutation``).

    Raises:
        ConfigError (a ValueError): unknown name (known names listed) or bad parameters.
    """
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = spec.pop("name", None)
    context = {k: v for k, v in {"experts": experts, "cache_dir": cache_dir,
                                 "fingerprints": fingerprints}.items() if v is not None}
    return MUTATIONS.build(name, spec, field=field, **context)
