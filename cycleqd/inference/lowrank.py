"""Children without materialisation: a genome's delta applied inside the forward pass.

For a compact SVD genome (:mod:`cycleqd.ops.genome`) a child's matrix delta is

    tau[W] = sum_k c_k tau_k[W] + sum_k U_k diag(s_k m_k[W]) V_k^T

and when expert k's basis covers its task vector (``tau_k[W] = U_k diag(s_k) V_k^T``: a
LoRA expert, or a full-rank SVD) this is ``sum_k U_k diag(s_k (c_k + m_k)) V_k^T``, so

    y = W0 x + b0 + sum_k U_k (a_k * (V_k^T x)) + db,     a_k = s_k (c_k + m_k)   (1)

needs no (m, n) temporary and no weight copy. :class:`LowRankChildren` wraps the
``forward`` of a HF causal LM's modules so (1) runs with one coefficient row ``a`` per batch
row: several children share one pass over ``W0`` (the punica/S-LoRA "one base, many
adapters" batching, on CPU).

Exactness per (matrix W, expert k):
  * ``U_k, s_k, V_k`` come from the mutation's basis (``svd_expert``) or, without one, from
    an SVD of ``tau_k[W]`` truncated at ``svd_tol``. When ``||tau_k - U S V^T||_F <=
    resid_tol ||tau_k||_F`` the residual is dropped (error below fp32 resolution of the
    logits); otherwise (a rank-truncated basis of a full-rank expert) ``c_k R_k x`` is added
    with the dense residual ``R_k`` -- exact, at dense cost ``m n``.
  * Without a mutation basis, when the SVD rank r has ``r (m + n) >= m n`` (a full
    fine-tune) the factored form would cost more than dense, so ``c_k tau_k[W] x`` is applied
    densely instead (still no weight copy, but ``m n`` FLOPs per expert).
  * Dense genomes (a :class:`~cycleqd.ops.DenseWeightSpace` child, a TIES aggregate) are not
    low rank: their ``tau[W] x`` is applied densely on their own rows.
  * Tensors of modules other than ``nn.Linear`` (embeddings, norms) are swapped per child
    (``theta_base + tau``, that tensor only), with rows grouped by child; modules whose
    delta is 0 for every child are left alone.

Cost per token of one Linear: dense ``m n``; factored ``m n + R (m + n)`` with ``R =
sum_k r_k``, so it pays in FLOPs only against materialisation (``K`` axpys + ``m n r``
for the mutation per matrix, plus the weight copy), never against an already-loaded dense
child; see docs/lowrank.md for measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from cycleqd.ops.genome import SVDGenome, SVDGenomeWeightSpace
from cycleqd.ops.mutation import SVDExpertMutation, effective_rank


@dataclass
class _Factors:
    """Per-Linear shared factors and the current children's per-row terms."""

    name: str
    U: torch.Tensor | None = None          # (m, R) fp32
    V: torch.Tensor | None = None          # (R, n) fp32
    S: torch.Tensor | None = None          # (R,) fp32
    spans: list[tuple[int, int, int]] = field(default_factory=list)  # (k, start, r_k)
    resid: dict[int, torch.Tensor] = field(default_factory=dict)      # k -> dense R_k (m, n)
    dense_c: dict[int, torch.Tensor] = field(default_factory=dict)    # k -> tau_k (m, n): no factors
    # per-batch state (set by LowRankChildren.set_children)
    A: torch.Tensor | None = None          # (B, R) coefficients s*(c+m)
    dense_terms: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (D (m,n), coef (B,))
    dbias: torch.Tensor | None = None      # (B, m)


class LowRankChildren:
    """Run a HF model as one or several children of ``space`` without materialising them.

    Usage::

        with LowRankChildren(model, space) as lr:
            lr.set_children([g0, g1, g2], rows=[0, 1, 2, 2])   # batch row -> child
            logits = model(input_ids).logits                     # (4, T, V)

    Args:
        model: a HF causal LM whose parameters hold ``space.base`` (theta_base), any dtype;
            the deltas are computed in fp32 and added in the layer's dtype.
        space: a :class:`~cycleqd.ops.SVDGenomeWeightSpace` (SVD genomes or dense task
            vectors) or a :class:`~cycleqd.ops.DenseWeightSpace` (dense task vectors).
        svd_tol: directions with ``s <= svd_tol * max(s)`` are dropped from own SVDs (as
            :class:`~cycleqd.ops.mutation.SVDExpertMutation`).
        resid_tol: relative Frobenius size under which a basis residual is dropped.
    Raises:
        ValueError: a model parameter with no tensor in ``space.base`` (wrong model).

    CPU only for now: factors and coefficients live on the CPU. The first positional
    argument of each wrapped module must carry the batch dimension first (true for HF
    Linear, Embedding and RMSNorm calls). Reads the space's operator (``space._mutation``)
    for the experts' SVD bases, so the factors are the ones the mutation uses.
    Source: the genome algebra of :mod:`cycleqd.ops.genome`; the per-row batching follows
    punica's BGMV/SGMV (Chen et al. 2023) and S-LoRA (Sheng et al. 2023).
    """

    def __init__(self, model: nn.Module, space: Any, *, svd_tol: float = 1e-6, resid_tol: float = 1e-4):
        self.model, self.space = model, space
        self.svd_tol, self.resid_tol = float(svd_tol), float(resid_tol)
        self.names = set(space.base.keys())
        self.is_svd_space = isinstance(space, SVDGenomeWeightSpace)
        alias: dict[int, str] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            if n in self.names:
                alias.setdefault(id(p), n)
        self.linears: dict[str, tuple[nn.Linear, _Factors]] = {}   # module name -> (module, factors)
        self._lin_bias: dict[str, str | None] = {}
        self.others: dict[str, tuple[nn.Module, dict[str, str]]] = {}  # module -> param -> sd name
        for mname, mod in model.named_modules():
            params = dict(mod.named_parameters(recurse=False))
            if not params:
                continue
            sd = {}
            for pn, p in params.items():
                q = f"{mname}.{pn}" if mname else pn
                sd[pn] = q if q in self.names else alias.get(id(p))
                if sd[pn] is None:
                    raise ValueError(f"LowRankChildren: model parameter {q!r} has no tensor in the "
                                     f"weight space's base (is this the space's model?)")
            if isinstance(mod, nn.Linear):
                f = self._factors(sd["weight"]) if self.is_svd_space else _Factors(name=sd["weight"])
                self.linears[mname] = (mod, f)
                self._lin_bias[mname] = sd.get("bias")
            else:
                self.others[mname] = (mod, sd)
        # non-Linear tensors that no expert changes (LoRA experts leave norms, embeddings):
        # their tau is 0 for every genome of an SVD space, so set_children skips them
        self._zero = {n for _, sd in self.others.values() for n in sd.values()
                      if self.is_svd_space and not any(bool(e[n].any()) for e in space.experts)}
        self._installed: list[nn.Module] = []
        self.B = 0

    @property
    def fully_factored(self) -> bool:
        """True when every child of the space runs as (1) alone: an SVD space whose experts
        are covered by their bases on every Linear (no dense residual, no densely applied
        expert) and change no other tensor (LoRA experts). Then the factored forward costs
        ``R (m + n)`` extra multiply-adds per token and Linear, nothing dense."""
        return (self.is_svd_space and all(not f.resid and not f.dense_c for _, f in self.linears.values())
                and all(n in self._zero for _, sd in self.others.values() for n in sd.values()))

    # --- shared factors (once per model) ------------------------------------------------
    def _factors(self, wname: str) -> _Factors:
        sp = self.space
        mut = sp._mutation
        Us, Vs, Ss, f = [], [], [], _Factors(name=wname)
        start = 0
        for k in range(sp.K):
            tau = sp.experts[k][wname].float()
            basis = mut.basis(k).get(wname) if isinstance(mut, SVDExpertMutation) else None
            if basis is None:
                U, S, Vh = torch.linalg.svd(tau, full_matrices=False)
                r = effective_rank(S, self.svd_tol)
                m, n = tau.shape
                if r * (m + n) >= m * n:   # factored would cost more than dense: apply tau_k densely
                    if r:
                        f.dense_c[k] = tau.contiguous()
                    continue
                U, S, Vh = U[:, :r], S[:r], Vh[:r]
            else:
                U, S, Vh = (t.float() for t in basis)
            r = S.numel()
            if r:
                resid = tau - (U * S) @ Vh
                if float(resid.norm()) > self.resid_tol * float(tau.norm()):
                    f.resid[k] = resid.contiguous()
                Us.append(U), Vs.append(Vh), Ss.append(S)
                f.spans.append((k, start, r))
                start += r
            elif bool(tau.any()):
                f.resid[k] = tau.contiguous()
        if Us:
            f.U, f.V, f.S = torch.cat(Us, 1).contiguous(), torch.cat(Vs, 0).contiguous(), torch.cat(Ss)
        return f

    # --- children ------------------------------------------------------------------------
    def _tau(self, name: str, genome: Any) -> torch.Tensor:
        if isinstance(genome, SVDGenome):
            return self.space.tensor_tau(name, genome)
        return genome[name].float()

    def set_children(self, genomes: Sequence[Any], rows: Sequence[int] | None = None) -> None:
        """Select the children of the next forward passes.

        Args:
            genomes: the distinct children (SVD genomes and/or dense task vectors).
            rows: (B,) child index of each batch row; default ``range(len(genomes))``. One
                genome without ``rows`` is applied to every row of batches of any size
                (how the evaluator runs one child through a generation backend whose
                batch grows and shrinks).
        Raises:
            ValueError: no genomes, or a row index out of range.
        """
        if not genomes:
            raise ValueError("set_children: need at least one genome")
        broadcast = rows is None and len(genomes) == 1
        rows = list(range(len(genomes))) if rows is None else [int(r) for r in rows]
        if not rows or min(rows) < 0 or max(rows) >= len(genomes):
            raise ValueError(f"set_children: rows must index the {len(genomes)} genomes, got {rows}")
        self.B, self.rows = (None if broadcast else len(rows)), torch.tensor(rows)
        G = len(genomes)
        onehot = torch.nn.functional.one_hot(self.rows, G).float()   # (B, G)
        for mname, (mod, f) in self.linears.items():
            f.dense_terms, f.A, f.dbias = [], None, None
            per_child = torch.zeros(G, f.S.numel()) if f.S is not None else None
            dense_c = torch.zeros(G, len(self.space.experts))
            for g, gen in enumerate(genomes):
                if not isinstance(gen, SVDGenome):          # dense child: its own tau on its rows
                    f.dense_terms.append((self._tau(f.name, gen), onehot[:, g]))
                    continue
                c = gen.c.float()
                dense_c[g] = c
                m = gen.m.get(f.name)
                for k, s0, r in f.spans:
                    a = torch.full((r,), float(c[k]))
                    if m is not None:
                        L = min(r, m.shape[1])
                        a[:L] += m[k, :L]
                    per_child[g, s0:s0 + r] = a * f.S[s0:s0 + r]
            if per_child is not None and bool(per_child.any()):
                f.A = onehot @ per_child                            # (B, R)
            for k, D in list(f.resid.items()) + list(f.dense_c.items()):
                coef = onehot @ dense_c[:, k]
                if bool(coef.any()):
                    f.dense_terms.append((D, coef))
            bname = self._lin_bias[mname]
            if bname is not None:
                db = torch.stack([self._tau(bname, gen) for gen in genomes])
                if bool(db.any()):
                    f.dbias = onehot @ db
        self.child_params: dict[str, list[dict[str, torch.Tensor] | None]] = {}
        for mname, (mod, sd) in self.others.items():
            per = []
            for gen in genomes:
                taus = {pn: self._tau(n, gen) for pn, n in sd.items()
                        if not (n in self._zero and isinstance(gen, SVDGenome) and n not in gen.m)}
                if any(bool(t.any()) for t in taus.values()):
                    per.append({pn: (self.space.base[sd[pn]].float() + t).to(getattr(mod, pn).dtype)
                                for pn, t in taus.items()})
                else:
                    per.append(None)
            if any(p is not None for p in per):
                self.child_params[mname] = per
        self._uninstall()
        self._install()

    # --- forward wrappers ----------------------------------------------------------------
    def _check_batch(self, x: torch.Tensor) -> None:
        if self.B is not None and x.shape[0] != self.B:
            raise ValueError(f"LowRankChildren: batch has {x.shape[0]} rows, set_children gave {self.B}")

    def _linear_forward(self, mod: nn.Linear, f: _Factors):
        orig = type(mod).forward.__get__(mod)

        def forward(x: torch.Tensor) -> torch.Tensor:
            self._check_batch(x)
            out = orig(x)
            xs = x.float()
            shape = (x.shape[0] if self.B is not None else 1,) + (1,) * (x.ndim - 2) + (-1,)
            delta = torch.zeros(out.shape, dtype=torch.float32)
            if f.A is not None:
                delta.add_(((xs @ f.V.T) * f.A.view(shape)) @ f.U.T)
            for D, coef in f.dense_terms:
                idx = torch.nonzero(coef).flatten()
                if idx.numel() == coef.numel():
                    delta.add_((xs @ D.T) * coef.view(shape))
                else:
                    delta[idx] += (xs[idx] @ D.T) * coef[idx].view((idx.numel(),) + shape[1:])
            if f.dbias is not None:
                delta.add_(f.dbias.view(shape))
            return out + delta.to(out.dtype)

        return forward

    def _grouped_forward(self, mod: nn.Module, per: list):
        orig = type(mod).forward.__get__(mod)
        groups: dict[int, torch.Tensor] = {}
        for g in sorted(set(self.rows.tolist())):
            groups[g] = torch.nonzero(self.rows == g).flatten()

        def run(params, x, *a, **kw):
            if params is None:
                return orig(x, *a, **kw)
            saved = {pn: mod._parameters[pn] for pn in params}
            try:
                mod._parameters.update(params)
                return orig(x, *a, **kw)
            finally:
                mod._parameters.update(saved)

        def forward(x, *a, **kw):
            self._check_batch(x)
            if len(groups) == 1:
                return run(per[next(iter(groups))], x, *a, **kw)
            out = None
            for g, idx in groups.items():
                y = run(per[g], x[idx], *a, **kw)
                if out is None:
                    out = y.new_empty((x.shape[0],) + y.shape[1:])
                out[idx] = y
            return out

        return forward

    def _install(self) -> None:
        for mname, (mod, f) in self.linears.items():
            if f.A is not None or f.dense_terms or f.dbias is not None:
                mod.forward = self._linear_forward(mod, f)
                self._installed.append(mod)
        for mname, per in self.child_params.items():
            mod = self.others[mname][0]
            mod.forward = self._grouped_forward(mod, per)
            self._installed.append(mod)

    def _uninstall(self) -> None:
        for mod in self._installed:
            del mod.forward
        self._installed = []

    def remove(self) -> None:
        """Restore the modules' own ``forward`` (the model computes theta_base again)."""
        self._uninstall()

    def __enter__(self) -> "LowRankChildren":
        return self

    def __exit__(self, *exc) -> None:
        self._uninstall()
