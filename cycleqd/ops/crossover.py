"""Crossover operators: model merging of task vectors.

Every operator is a :class:`TensorwiseCrossover`: it draws its model-wise random state once
per child (:meth:`~TensorwiseCrossover.prepare`) and then merges one tensor at a time
(:meth:`~TensorwiseCrossover.merge_tensor`), so the same object serves the in-memory
``__call__(parents, generator=...)`` of the ``Crossover`` protocol and streaming merges of
8B models (see :func:`cycleqd.engine.export.stream_merge`), one tensor in memory at a time.

All inputs are task vectors ``tau_i = theta_i - theta_base`` (fp32; any shape); outputs
are fp32 task vectors of the same shapes. The random state comes only from the explicit
``torch.Generator``; tensors are visited in the parents' key order.

Operators and their sources:

* ``linear`` -- CycleQD's crossover (paper §3.2, official ``ModelwiseLinearMerge``):
  ``tau = sum_i w_i tau_i / sum_i w_i``, ``w_i ~ N(1 + mu, |sigma|)`` one scalar per
  parent for the whole model (official ``std = 0.01``).
* ``task_arithmetic`` -- Ilharco et al. 2023: ``tau = lambda * sum_i w_i tau_i``
  (``/ sum_i w_i`` when ``normalize``).
* ``ties`` -- Yadav et al. 2023 as implemented by mergekit 0.1.5: per parent keep the
  top-``density`` fraction by magnitude (``k = max(1, int(density * numel))``), weight,
  elect the sign per element from the sum of the weighted deltas, keep the agreeing
  entries, divide by the sum of the agreeing weights (``normalize``), times ``lambda``.
* ``dare`` / ``dare_ties`` -- Yu et al. 2023 as in mergekit: keep each entry with
  probability ``density`` (Bernoulli, our generator), rescale (``"l1"`` = mergekit: match
  the L1 norm of the unpruned delta; ``"inverse_density"`` = the DARE paper's ``1/p``),
  weight and sum (``dare``) or TIES sign election (``dare_ties``).
* ``slerp`` -- spherical interpolation of two parents (Shoemake 1985) as in mergekit:
  by default of the full weights ``theta_i = theta_base + tau_i``, each tensor flattened
  and interpolated on one great circle (``granularity="tensor"``; ``"row"`` interpolates
  each output row separately), linear interpolation where ``|cos| > dot_threshold``.

Equivalence with mergekit (``max |diff| <= 1e-5`` in fp32; DARE given the same drop mask)
is checked by ``tests/ops/test_mergekit_equivalence.py``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

from cycleqd._lazy import lazy_import
from cycleqd.ops.base import TaskVector
from cycleqd.registry import CROSSOVERS

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")


#: the keys the ``**kw`` of a crossover factory accepts: ``lambda`` (a Python keyword)
_LAMBDA = ("lambda", "lambda_")


def _check_parents(parents: Sequence[Mapping[str, torch.Tensor]], *, n: int | None = None,
                   op: str = "crossover") -> None:
    if len(parents) == 0:
        raise ValueError(f"{op}: needs at least one parent")
    if n is not None and len(parents) != n:
        raise ValueError(f"{op}: needs exactly {n} parents, got {len(parents)}")
    keys = list(parents[0].keys())
    for i, p in enumerate(parents[1:], 1):
        if list(p.keys()) != keys:
            diff = sorted(set(p.keys()) ^ set(keys))
            raise ValueError(f"{op}: parent {i} has different tensors than parent 0"
                             + (f" (first difference: {diff[0]!r})" if diff else " (order differs)"))
        for k in keys:
            if p[k].shape != parents[0][k].shape:
                raise ValueError(f"{op}: tensor {k!r} has shape {tuple(p[k].shape)} in parent {i} "
                                 f"but {tuple(parents[0][k].shape)} in parent 0")


def _finite(value: Any, field: str) -> float:
    """``float(value)``, refusing NaN/inf and non-numbers with a ValueError naming ``field``."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field}={value!r}: must be a number") from None
    if not math.isfinite(x):
        raise ValueError(f"{field}={value!r}: must be a finite number")
    return x


def _check_numbers(value: float | Sequence[float], field: str) -> None:
    """A scalar or per-parent list of finite numbers (checked at construction)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        _finite(value, field)
    else:
        for v in value:
            _finite(v, field)


def _per_parent(value: float | Sequence[float], n: int, field: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [_finite(value, field)] * n
    vals = [_finite(v, field) for v in value]
    if len(vals) != n:
        raise ValueError(f"{field}: {len(vals)} values given for {n} parents")
    return vals


class TensorwiseCrossover:
    """Base class: a crossover that merges each tensor independently.

    Subclasses implement :meth:`merge_tensor` and optionally :meth:`prepare`.
    ``n_parents`` (``None`` = any number >= 1) is checked before any work.
    """

    name: str = "?"
    n_parents: int | None = None

    def prepare(self, n: int, generator: torch.Generator) -> Any:
        """Draw the model-wise random state for one child (called once per child)."""
        return None

    def merge_tensor(self, name: str, taus: Sequence[torch.Tensor], state: Any,
                     generator: torch.Generator) -> torch.Tensor:
        """Merge one tensor. ``taus``: the parents' fp32 tensors (same shape S); returns (S,) fp32."""
        raise NotImplementedError

    def __call__(self, parents: Sequence[TaskVector], *, generator: torch.Generator) -> TaskVector:
        _check_parents(parents, n=self.n_parents, op=self.name)
        state = self.prepare(len(parents), generator)
        return {k: self.merge_tensor(k, [p[k].float() for p in parents], state, generator)
                for k in parents[0]}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def weighted_sum(parents: Sequence[TaskVector], weights: Sequence[float]) -> TaskVector:
    """``sum_i weights[i] * parents[i]`` per tensor in fp32 (shapes preserved)."""
    return {k: _wsum([p[k] for p in parents], weights) for k in parents[0]}


def _wsum(taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    acc = taus[0].float() * float(weights[0])
    for w, t in zip(weights[1:], taus[1:]):
        acc.add_(t.float(), alpha=float(w))
    return acc


def linear_merge_weights(n: int, *, mu: float, sigma: float, generator: torch.Generator) -> list[float]:
    """Draw n model-wise weights ``w_i ~ N(1 + mu, |sigma|)`` and normalise them to sum to 1.

    One ``torch.randn(n, float64)`` draw from ``generator`` (official: ``torch.normal``
    then ``/ weights.sum()``).

    Raises:
        ValueError: the weights sum to (nearly) zero.
    """
    w = torch.randn(n, generator=generator, dtype=torch.float64) * abs(sigma) + (1.0 + mu)
    s = float(w.sum())
    if abs(s) < 1e-12:
        raise ValueError("linear crossover: merge weights sum to zero")
    return [float(x) / s for x in w]


class LinearCrossover(TensorwiseCrossover):
    """CycleQD's model-wise linear merge (see module docstring)."""

    name = "linear"

    def __init__(self, mu: float = 0.0, sigma: float = 0.01):
        self.mu, self.sigma = _finite(mu, "linear.mu"), _finite(sigma, "linear.sigma")
        if self.sigma < 0:
            raise ValueError(f"linear.sigma={sigma!r}: must be >= 0 (the standard deviation of the "
                             "merge weights)")

    def merge_weights(self, n: int, generator: torch.Generator) -> list[float]:
        """The normalised weights the next child would get (consumes the generator)."""
        return linear_merge_weights(n, mu=self.mu, sigma=self.sigma, generator=generator)

    def prepare(self, n, generator):
        return self.merge_weights(n, generator)

    def merge_tensor(self, name, taus, state, generator):
        return _wsum(taus, state)


@CROSSOVERS.register("linear", source="CycleQD paper §3.2; official code ModelwiseLinearMerge "
                     "(SakanaAI/CycleQD)", svd_genome=True)
def linear(mu: float = 0.0, sigma: float = 0.01) -> LinearCrossover:
    """Model-wise linear merge (official CycleQD crossover). Shapes preserved, fp32."""
    return LinearCrossover(mu=mu, sigma=sigma)


class TaskArithmetic(TensorwiseCrossover):
    """``tau = lambda * sum_i w_i tau_i [/ sum_i w_i]`` (mergekit ``task_arithmetic``)."""

    name = "task_arithmetic"

    def __init__(self, weights: float | Sequence[float] = 1.0, lambda_: float = 1.0,
                 normalize: bool = False):
        _check_numbers(weights, "task_arithmetic.weights")
        self.weights, self.lambda_ = weights, _finite(lambda_, "task_arithmetic.lambda")
        self.normalize = bool(normalize)

    def prepare(self, n, generator):
        w = _per_parent(self.weights, n, "task_arithmetic.weights")
        scale = self.lambda_
        if self.normalize:
            s = sum(w)
            scale = scale / (s if abs(s) >= 1e-8 else 1.0)  # mergekit: divisor 1 if |sum|<1e-8
        return [x * scale for x in w]

    def merge_tensor(self, name, taus, state, generator):
        return _wsum(taus, state)


@CROSSOVERS.register("task_arithmetic", source="Ilharco et al. 2023; mergekit task_arithmetic",
                     extra=_LAMBDA, svd_genome=True)
def task_arithmetic(weights: float | Sequence[float] = 1.0, normalize: bool = False,
                    **kw) -> TaskArithmetic:
    """Task arithmetic. ``lambda`` (config key) / ``lambda_`` scales the sum (default 1)."""
    return TaskArithmetic(weights=weights, lambda_=_pop_lambda(kw, "task_arithmetic"),
                          normalize=normalize)


def _pop_lambda(kw: dict, op: str) -> float:
    lam = kw.pop("lambda", kw.pop("lambda_", 1.0))
    if kw:
        raise ValueError(f"{op}: unknown parameter(s) {sorted(kw)}")
    return _finite(lam, f"{op}.lambda")


# --- sparsification and sign election (TIES / DARE) ---------------------------------

def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``k = max(1, int(density * numel))`` largest-magnitude entries, zero the rest.

    ``density >= 1`` returns ``delta``; ``density <= 0`` zeros. Shape/dtype preserved.
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(delta.shape)


def rescale_to_norm(original: torch.Tensor, masked: torch.Tensor, norm: str,
                    eps: float = 1e-7) -> torch.Tensor:
    """Rescale ``masked`` so its L1/L2/Linf norm equals ``original``'s (mergekit's
    ``rescaled_masked_tensor``); unchanged if either norm is below ``eps``."""
    if norm == "l1":
        before, after = original.abs().sum(), masked.abs().sum()
    elif norm == "l2":
        before, after = original.norm(), masked.norm()
    elif norm == "linf":
        before, after = original.abs().max(), masked.abs().max()
    else:
        raise ValueError(f"rescale norm {norm!r}: expected l1, l2 or linf")
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def sign_consensus_mask(deltas: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """TIES sign election. ``deltas``: (P, *S) weighted deltas. Returns a bool (P, *S) mask
    of the entries whose sign equals the elected sign (``sum``: sign of the sum, ties ->
    +; ``count``: majority of signs). Zero entries never agree (mergekit semantics)."""
    sign = deltas.sign()
    if method == "sum":
        majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    elif method == "count":
        majority = (sign.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    else:
        raise ValueError(f"consensus {method!r}: expected 'sum' or 'count'")
    return sign == majority


def _combine(deltas: list[torch.Tensor], weights: list[float], *, consensus: str | None,
             normalize: bool, lambda_: float) -> torch.Tensor:
    """mergekit's GeneralizedTaskArithmeticMerge tail on pruned deltas (each shape S)."""
    d = torch.stack(deltas)  # (P, *S)
    w = torch.tensor(weights, dtype=d.dtype).reshape((-1,) + (1,) * (d.dim() - 1))
    d.mul_(w)
    if consensus:
        mask = sign_consensus_mask(d, consensus)
        mixed = (d * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = d.sum(dim=0)
        s = float(sum(weights))
        divisor = s if abs(s) >= 1e-8 else 1.0
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return mixed


class Ties(TensorwiseCrossover):
    """TIES-merging (trim, elect sign, disjoint merge); see module docstring."""

    name = "ties"

    def __init__(self, weights: float | Sequence[float] = 1.0,
                 density: float | Sequence[float] = 0.5, normalize: bool = True,
                 lambda_: float = 1.0, consensus: Literal["sum", "count"] = "sum"):
        if consensus not in ("sum", "count"):
            raise ValueError(f"ties.consensus={consensus!r}: expected 'sum' or 'count'")
        _check_numbers(weights, "ties.weights")
        _check_density(_as_list(density, "ties.density"), "ties")
        self.weights, self.density = weights, density
        self.normalize, self.lambda_, self.consensus = bool(normalize), _finite(lambda_, "ties.lambda"), consensus

    def prepare(self, n, generator):
        return (_per_parent(self.weights, n, "ties.weights"),
                _check_density(_per_parent(self.density, n, "ties.density"), "ties"))

    def merge_tensor(self, name, taus, state, generator):
        weights, density = state
        pruned = [magnitude_prune(t, p) for t, p in zip(taus, density)]
        return _combine(pruned, weights, consensus=self.consensus, normalize=self.normalize,
                        lambda_=self.lambda_)


#: Smallest DARE density accepted. DARE keeps each entry with probability ``density`` and
#: rescales what it keeps by about ``1 / density`` (``inverse_density``, and ``l1`` on
#: average), so a density of 1e-8 multiplies kept fp16/bf16 deltas by 1e8 and the merged
#: weights overflow to inf (a public mergekit report). Yu et al. 2023 (DARE) evaluate drop
#: rates up to 0.99; 1e-3 (drop rate 0.999, kept entries scaled ~1000x) is well beyond that.
MIN_DARE_DENSITY = 1e-3


def _as_list(value: float | Sequence[float], field: str) -> list[float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return [_finite(value, field)]
    return [_finite(v, field) for v in value]


def _check_density(d: list[float], op: str, minimum: float = 0.0) -> list[float]:
    for x in d:
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"{op}.density={x}: must be in [0, 1]")
        if x < minimum:
            raise ValueError(f"{op}.density={x:g}: below the minimum {minimum:g}: DARE rescales the "
                             f"kept entries by about 1/density ({1 / x if x else math.inf:.3g}x), which "
                             "overflows 16-bit weights to inf; use a density >= "
                             f"{minimum:g} (DARE's paper goes down to 0.01)")
    return d


@CROSSOVERS.register("ties", source="Yadav et al. 2023; mergekit 0.1.5 ties", extra=_LAMBDA)
def ties(weights: float | Sequence[float] = 1.0, density: float | Sequence[float] = 0.5,
         normalize: bool = True, consensus: str = "sum", **kw) -> Ties:
    """TIES merge (mergekit semantics). ``lambda`` scales the result."""
    return Ties(weights=weights, density=density, normalize=normalize,
                lambda_=_pop_lambda(kw, "ties"), consensus=consensus)


class Dare(TensorwiseCrossover):
    """DARE: random drop (keep prob ``density``) + rescale, then sum or TIES election.

    ``keep_masks=True`` records every drop mask in ``self.last_masks[(name, parent)]``
    (bool, shape S) -- for tests and debugging; costs one bool per weight.
    """

    name = "dare"

    def __init__(self, weights: float | Sequence[float] = 1.0,
                 density: float | Sequence[float] = 0.5,
                 rescale: Literal["l1", "inverse_density", "none"] | bool = "l1",
                 consensus: Literal["sum", "count"] | None = None, normalize: bool = False,
                 lambda_: float = 1.0, keep_masks: bool = False):
        if rescale is True:
            rescale = "l1"
        elif rescale is False or rescale is None:
            rescale = "none"
        if rescale not in ("l1", "l2", "linf", "inverse_density", "none"):
            raise ValueError(f"dare.rescale={rescale!r}: expected l1, inverse_density or none")
        if consensus not in (None, "sum", "count"):
            raise ValueError(f"dare.consensus={consensus!r}: expected None, 'sum' or 'count'")
        _check_numbers(weights, "dare.weights")
        _check_density(_as_list(density, "dare.density"), "dare", MIN_DARE_DENSITY)
        self.weights, self.density, self.rescale = weights, density, rescale
        self.consensus, self.normalize = consensus, bool(normalize)
        self.lambda_ = _finite(lambda_, "dare.lambda")
        self.keep_masks = keep_masks
        self.last_masks: dict[tuple[str, int], torch.Tensor] = {}

    def prepare(self, n, generator):
        if self.keep_masks:
            self.last_masks = {}
        return (_per_parent(self.weights, n, "dare.weights"),
                _check_density(_per_parent(self.density, n, "dare.density"), "dare", MIN_DARE_DENSITY))

    def drop(self, name: str, i: int, tau: torch.Tensor, density: float,
             generator: torch.Generator) -> torch.Tensor:
        """Bernoulli(density) keep-mask on ``tau`` and rescale, computed in fp32 (mergekit's
        ``sparsify.bernoulli`` works in the tensor's dtype; fp32 here, so the rescale itself
        cannot overflow 16-bit types). Returns (S,) fp32.

        Raises:
            ValueError: the rescaled delta is not finite (names the tensor).
        """
        if density >= 1:
            return tau
        tau = tau.float()
        keep = torch.rand(tau.shape, generator=generator) < density
        if self.keep_masks:
            self.last_masks[(name, i)] = keep
        masked = tau * keep
        if self.rescale == "inverse_density":
            out = masked / density if density > 0 else masked
        elif self.rescale == "none":
            out = masked
        else:
            out = rescale_to_norm(tau, masked, self.rescale)
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"dare: tensor {name!r} of parent {i} is not finite after dropping with "
                             f"density {density:g} and rescaling ({self.rescale})")
        return out

    def merge_tensor(self, name, taus, state, generator):
        weights, density = state
        dropped = [self.drop(name, i, t, p, generator) for i, (t, p) in enumerate(zip(taus, density))]
        return _combine(dropped, weights, consensus=self.consensus, normalize=self.normalize,
                        lambda_=self.lambda_)


@CROSSOVERS.register("dare", source="Yu et al. 2023; mergekit dare_linear", extra=_LAMBDA)
def dare(weights: float | Sequence[float] = 1.0, density: float | Sequence[float] = 0.5,
         rescale: str | bool = "l1", normalize: bool = False, consensus: str | None = None,
         keep_masks: bool = False, **kw) -> Dare:
    """DARE without sign election (mergekit ``dare_linear``) unless ``consensus`` is set."""
    d = Dare(weights=weights, density=density, rescale=rescale, consensus=consensus,
             normalize=normalize, lambda_=_pop_lambda(kw, "dare"), keep_masks=keep_masks)
    return d


@CROSSOVERS.register("dare_ties", source="Yu et al. 2023; mergekit dare_ties", extra=_LAMBDA)
def dare_ties(weights: float | Sequence[float] = 1.0, density: float | Sequence[float] = 0.5,
              rescale: str | bool = "l1", normalize: bool = False, consensus: str = "sum",
              keep_masks: bool = False, **kw) -> Dare:
    """DARE with TIES sign election (mergekit ``dare_ties``)."""
    d = Dare(weights=weights, density=density, rescale=rescale, consensus=consensus,
             normalize=normalize, lambda_=_pop_lambda(kw, "dare_ties"), keep_masks=keep_masks)
    d.name = "dare_ties"
    return d


# --- SLERP ----------------------------------------------------------------------------

def slerp_tensor(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dot_threshold: float = 0.9995,
                 eps: float = 1e-8, granularity: Literal["row", "tensor"] = "tensor") -> torch.Tensor:
    """Spherical interpolation between ``v0`` and ``v1`` (same shape S), fp32.

    ``granularity="tensor"``: the whole flattened tensor at once (mergekit).
    ``"row"``: each slice along dim 0 (an output row of a weight matrix; each entry of a
    1-D tensor) on its own great circle. Where ``|cos(angle)| >
    dot_threshold`` the interpolation is linear. Returns shape S, fp32.
    """
    a, b = v0.float(), v1.float()
    if granularity == "row" and a.dim() >= 1:
        a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    elif granularity in ("row", "tensor"):
        a2, b2 = a.reshape(1, -1), b.reshape(1, -1)
    else:
        raise ValueError(f"slerp.granularity={granularity!r}: expected 'row' or 'tensor'")
    if a2.shape[1] == 0:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    na = torch.linalg.vector_norm(a2, dim=1, keepdim=True)
    nb = torch.linalg.vector_norm(b2, dim=1, keepdim=True)
    na = torch.where(na > eps, na, torch.ones_like(na))
    nb = torch.where(nb > eps, nb, torch.ones_like(nb))
    dot = ((a2 / na) * (b2 / nb)).sum(dim=1, keepdim=True).clamp(-1, 1)
    lin = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(lin, torch.zeros_like(dot), dot))
    sin_t = torch.sin(theta)
    ca = torch.where(lin, torch.full_like(dot, 1 - t), torch.sin((1 - t) * theta) / sin_t)
    cb = torch.where(lin, torch.full_like(dot, t), torch.sin(t * theta) / sin_t)
    return (ca * a2 + cb * b2).reshape(v0.shape)


class Slerp(TensorwiseCrossover):
    """SLERP of two parents; ``t = 0`` gives parent 0, ``t = 1`` parent 1.

    Args:
        t: interpolation factor in [0, 1].
        base: theta_base (name -> tensor). Needed for ``space="weights"`` (default, as
            mergekit: interpolate full weights ``theta_base + tau_i``); ``space="task_vector"``
            interpolates the task vectors themselves and needs no base.
        dot_threshold, eps, granularity: see :func:`slerp_tensor`.
    """

    name = "slerp"
    n_parents = 2

    def __init__(self, t: float = 0.5, base: Mapping[str, torch.Tensor] | None = None,
                 space: Literal["weights", "task_vector"] = "weights",
                 dot_threshold: float = 0.9995, eps: float = 1e-8,
                 granularity: Literal["row", "tensor"] = "tensor"):
        if not 0.0 <= _finite(t, "slerp.t") <= 1.0:
            raise ValueError(f"slerp.t={t}: must be in [0, 1]")
        if space not in ("weights", "task_vector"):
            raise ValueError(f"slerp.space={space!r}: expected 'weights' or 'task_vector'")
        if space == "weights" and base is None:
            raise ValueError("slerp with space='weights' needs the base weights (base=...)")
        if granularity not in ("row", "tensor"):
            raise ValueError(f"slerp.granularity={granularity!r}: expected 'row' or 'tensor'")
        self.t, self.space, self.granularity = float(t), space, granularity
        self.dot_threshold, self.eps = _finite(dot_threshold, "slerp.dot_threshold"), _finite(eps, "slerp.eps")
        self._base = base

    def merge_tensor(self, name, taus, state, generator):
        a, b = taus
        if self.space == "weights":
            base = self._base[name].float()
            merged = slerp_tensor(self.t, base + a, base + b, dot_threshold=self.dot_threshold,
                                  eps=self.eps, granularity=self.granularity)
            return merged - base
        return slerp_tensor(self.t, a, b, dot_threshold=self.dot_threshold, eps=self.eps,
                            granularity=self.granularity)


@CROSSOVERS.register("slerp", source="Shoemake 1985; mergekit slerp", context=("base",),
                     dry_context={"base": {}})
def slerp(t: float = 0.5, base: Mapping[str, torch.Tensor] | None = None,
          space: str = "weights", dot_threshold: float = 0.9995, eps: float = 1e-8,
          granularity: str = "tensor") -> Slerp:
    """SLERP crossover of exactly two parents (see :class:`Slerp`)."""
    return Slerp(t=t, base=base, space=space, dot_threshold=dot_threshold, eps=eps,
                 granularity=granularity)


def make_crossover(spec: Mapping[str, Any] | str, *, base: Mapping[str, torch.Tensor] | None = None,
                   field: str | None = None) -> TensorwiseCrossover:
    """Build a crossover from a config dict ``{"name": ..., **kwargs}`` (or a bare name)
    through :data:`cycleqd.registry.CROSSOVERS`.

    ``base`` is passed to operators that need theta_base (``slerp``); ``field`` is the config
    path named in errors (e.g. ``operators.crossover``).

    Raises:
        ConfigError (a ValueError): unknown name (the known names are listed) or bad parameters.
    """
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = spec.pop("name", None)
    return CROSSOVERS.build(name, spec, field=field, base=base)
