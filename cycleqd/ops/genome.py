"""Compact SVD genomes: store a child as a few coefficient vectors instead of a checkpoint.

With a *linear* crossover (CycleQD's model-wise merge, or task arithmetic with fixed
weights) and the *expert-SVD* mutation, every child's task vector lies in a small,
known family. Write the K experts' task vectors ``tau_k`` and, per selected matrix
``W``, the SVD ``tau_k[W] ~= U_k diag(s_k) V_k^T`` (possibly rank-truncated). Then by
induction every child is

    tau[W] = sum_k c_k tau_k[W] + sum_k U_k diag(s_k * m_k[W]) V_k^T     (matrices)
    tau[t] = sum_k c_k tau_k[t]                                          (1-D / unselected)

with ``c`` (K,) model-wise coefficients and ``m_k[W]`` (r_W,) mutation coefficients:
an expert is ``c = e_k, m = 0``; a crossover with weights ``w_i`` gives ``c = sum_i w_i c_i``,
``m = sum_i w_i m_i``; an SVD mutation in skill q's basis adds ``r`` to ``m_q[W]``. At full
rank ``c_k tau_k[W] = U_k diag(s_k c_k) V_k^T``, i.e. the issue's ``a_k = c_k + m_k``
per matrix; keeping ``c`` separate makes the representation *exact for any rank
truncation* (the residual ``tau_k - U_k S_k V_k^T`` simply rides along with ``c_k``).

Bytes per genome: ``4 * (K + K * sum_W r_W)`` (fp32) plus the safetensors header -- for
SmolLM2-135M with K = 2 at full rank ~0.8 MB, ~0.15 % of its fp32 checkpoint (0.3 % of
bf16); the mutation coefficients of experts that never served as a mutation basis in the
genome's lineage are not stored.

Materialisation costs ``K`` axpys per tensor plus, for each expert with non-zero ``m``,
one (m x r) @ (r x n) product per matrix -- the same product the dense SVD mutation
computes once per child.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from safetensors import safe_open

from cycleqd._lazy import lazy_import
from cycleqd.ops.base import Crossover, Mutation, TaskVector, with_params
from cycleqd.ops.mutation import NoMutation, add_svd_perturbation
from cycleqd.registry import CROSSOVERS, MUTATIONS, Registry, svd_genome_compatible

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")
_st = lazy_import("safetensors.torch")   # imports torch: bound on first use


def save_file(tensors: Mapping[str, torch.Tensor], filename: str, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file``, imported on first use (it imports torch)."""
    _st.save_file(tensors, filename, metadata=metadata)

GENOME_FORMAT = "cycleqd-svd-genome/1"
DENSE_FORMAT = "cycleqd-task-vector/1"


@dataclass
class SVDGenome:
    """A child in coefficient form.

    Attributes:
        c: (K,) fp64 model-wise expert coefficients (stored as fp64: 8 bytes each).
        m: name -> (K, r_name) fp32 mutation coefficients, for matrices only; a missing
            name means all zeros.
    """

    c: torch.Tensor
    m: dict[str, torch.Tensor] = field(default_factory=dict)
    # m[name] is (K, L): row k holds the coefficients of expert k's first kept singular
    # directions (experts keep different numbers of directions; shorter rows are 0-padded)

    def nbytes(self) -> int:
        """In-memory bytes of the coefficients."""
        return self.c.numel() * self.c.element_size() + sum(
            t.numel() * t.element_size() for t in self.m.values())


class SVDGenomeWeightSpace:
    """WeightSpace whose genomes are :class:`SVDGenome` coefficient sets.

    Args:
        base: theta_base, name -> tensor in its stored dtype (may be a lazy mapping).
        experts: the K experts' task vectors in skill order (fp32, may be lazy).
        crossover: a crossover registered with ``svd_genome=True`` (``linear``,
            ``task_arithmetic``: ``prepare(n, generator)`` returns the n weights).
        mutation: a mutation registered with ``svd_genome=True`` (``svd_expert``, ``none``).
    Raises:
        ValueError: operators that do not keep children in the genome family (use
            :class:`cycleqd.ops.DenseWeightSpace` for those).
    """

    genome_suffix = ".genome.safetensors"

    def __init__(self, base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                 crossover: Crossover, mutation: Mutation):
        if not genome_compatible(crossover, "none"):
            raise ValueError(f"compact SVD genomes need a linear crossover (registered with "
                             f"svd_genome=True: {_svd_names(CROSSOVERS)}), got {crossover!r}; "
                             f"use genome='dense'")
        if not genome_compatible("linear", mutation):
            raise ValueError(f"compact SVD genomes need mutation {' or '.join(_svd_names(MUTATIONS))} "
                             f"(registered with svd_genome=True), got {type(mutation).__name__}; "
                             f"use genome='dense'")
        if len(experts) == 0:
            raise ValueError("SVDGenomeWeightSpace needs at least one expert")
        self.base = base
        self.experts = list(experts)
        self.K = len(self.experts)
        self._crossover, self._mutation = crossover, mutation
        self.names = list(base.keys())

    # --- genomes -----------------------------------------------------------------
    def expert_genomes(self) -> list[SVDGenome]:
        return [SVDGenome(c=torch.nn.functional.one_hot(torch.tensor(k), self.K).double())
                for k in range(self.K)]

    def base_genome(self) -> SVDGenome:
        return SVDGenome(c=torch.zeros(self.K, dtype=torch.float64))

    def crossover(self, parents: Sequence[SVDGenome], generator: torch.Generator, *,
                  params: Mapping[str, float] | None = None) -> SVDGenome:
        if any(not isinstance(p, SVDGenome) for p in parents):
            raise ValueError("crossover in the SVD genome space needs SVDGenome parents (a dense "
                             "aggregate cannot be a parent)")
        if len(parents) == 0:
            raise ValueError("crossover needs at least one parent")
        n_par = getattr(self._crossover, "n_parents", None)
        if n_par is not None and len(parents) != n_par:
            raise ValueError(f"crossover needs exactly {n_par} parents, got {len(parents)}")
        w = with_params(self._crossover, params).prepare(len(parents), generator)
        c = sum(float(wi) * p.c for wi, p in zip(w, parents))
        m: dict[str, torch.Tensor] = {}
        for name in self.names:
            terms = [(float(wi), p.m[name]) for wi, p in zip(w, parents) if name in p.m]
            if terms:
                L = max(t.shape[1] for _, t in terms)
                acc = torch.zeros(self.K, L, dtype=torch.float32)
                for wi, t in terms:
                    acc[:, : t.shape[1]].add_(t, alpha=wi)
                m[name] = acc
        return SVDGenome(c=c, m=m)

    def mutate(self, genome: SVDGenome, skill: int, generator: torch.Generator, *,
               params: Mapping[str, float] | None = None) -> SVDGenome:
        if not isinstance(genome, SVDGenome):
            raise ValueError("mutate in the SVD genome space needs an SVDGenome")
        if isinstance(self._mutation, NoMutation):
            return genome
        if not 0 <= skill < self.K:
            raise ValueError(f"mutate: skill {skill} out of range (K={self.K})")
        rs = with_params(self._mutation, params).draw(self.names, skill, generator)
        m = dict(genome.m)
        for name, r in rs.items():
            cur = m.get(name)
            L = max(r.numel(), cur.shape[1] if cur is not None else 0)
            new = torch.zeros(self.K, L, dtype=torch.float32)
            if cur is not None:
                new[:, : cur.shape[1]] = cur
            new[skill, : r.numel()] += r
            m[name] = new
        return SVDGenome(c=genome.c.clone(), m=m)

    # --- weights -----------------------------------------------------------------
    def _bases_for(self, genome: SVDGenome) -> dict[int, Mapping]:
        used = set()
        for t in genome.m.values():
            used.update(int(k) for k in torch.nonzero(t.abs().sum(dim=1)).flatten())
        return {k: self._mutation.basis(k) for k in sorted(used)}

    def tensor_tau(self, name: str, genome: SVDGenome, bases: Mapping[int, Mapping] | None = None
                   ) -> torch.Tensor:
        """The genome's task vector for one tensor: fp32, the base tensor's shape."""
        bases = self._bases_for(genome) if bases is None else bases
        acc = None
        for k in range(self.K):
            ck = float(genome.c[k])
            if ck != 0.0:
                t = self.experts[k][name]
                acc = t.float() * ck if acc is None else acc.add_(t, alpha=ck)
        if acc is None:
            acc = torch.zeros(self.base[name].shape, dtype=torch.float32)
        if name in genome.m:
            mk = genome.m[name]
            for k, basis in bases.items():
                if name in basis and bool(mk[k].any()):
                    add_svd_perturbation(acc, basis[name], mk[k])
        return acc

    def task_vector(self, genome: SVDGenome | TaskVector) -> TaskVector:
        if not isinstance(genome, SVDGenome):  # a dense task vector (e.g. a TIES aggregate)
            return genome
        bases = self._bases_for(genome)
        return {n: self.tensor_tau(n, genome, bases) for n in self.names}

    def iter_materialized(self, genome: SVDGenome | TaskVector):
        """Yield (name, theta tensor) one tensor at a time (base order, base's dtype): a
        streaming export holds one tensor's fp32 work at once."""
        if not isinstance(genome, SVDGenome):
            for n in self.names:
                b = self.base[n]
                yield n, (b.float() + genome[n].float()).to(b.dtype)
            return
        bases = self._bases_for(genome)
        for n in self.names:
            b = self.base[n]
            yield n, self.tensor_tau(n, genome, bases).add_(b).to(b.dtype)  # fp32, in place

    def materialize(self, genome: SVDGenome | TaskVector) -> dict[str, torch.Tensor]:
        """theta = theta_base + tau per tensor (fp32 arithmetic, base's stored dtype).

        Accepts an :class:`SVDGenome` or a dense task vector (aggregates made by non-linear
        merges such as TIES are stored densely)."""
        return dict(self.iter_materialized(genome))

    # --- storage -----------------------------------------------------------------
    def save(self, genome: SVDGenome | TaskVector, path: Path) -> int:
        """Write the genome atomically as safetensors (``c`` fp64, ``m.<name>`` fp32 with
        all-zero expert rows dropped; a dense task vector as fp32 tensors). Returns bytes
        written."""
        path = Path(path)
        if not isinstance(genome, SVDGenome):
            tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
            save_file({n: genome[n].float().contiguous() for n in self.names}, str(tmp),
                      metadata={"format": DENSE_FORMAT})
            os.replace(tmp, path)
            return path.stat().st_size
        tensors: dict[str, torch.Tensor] = {"c": genome.c.double().contiguous()}
        rows: dict[str, list[int]] = {}
        for name, t in genome.m.items():
            keep = [k for k in range(t.shape[0]) if bool(t[k].any())]
            if keep:
                tensors[f"m.{name}"] = t[keep].contiguous()
                rows[name] = keep
        meta = {"format": GENOME_FORMAT, "K": str(self.K), "rows": json.dumps(rows)}
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path.stat().st_size

    def load(self, path: Path) -> SVDGenome:
        """Read a genome written by :meth:`save`.

        Raises:
            ValueError: not a genome file, or written for a different number of experts.
        """
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") == DENSE_FORMAT:
                    return {n: f.get_tensor(n) for n in self.names}
                if meta.get("format") != GENOME_FORMAT:
                    raise ValueError(f"{path} is not a cycleqd SVD genome (format="
                                     f"{meta.get('format')!r})")
                if int(meta["K"]) != self.K:
                    raise ValueError(f"{path}: genome has K={meta['K']} experts, this run has {self.K}")
                rows = json.loads(meta["rows"])
                c = f.get_tensor("c")
                m = {}
                for name, keep in rows.items():
                    small = f.get_tensor(f"m.{name}")
                    full = torch.zeros(self.K, small.shape[1], dtype=torch.float32)
                    full[keep] = small
                    m[name] = full
        except (ValueError, KeyError):
            raise
        except Exception as e:  # safetensors raises SafetensorError for corrupt files
            raise ValueError(f"cannot read genome {path}: {e}") from e
        return SVDGenome(c=c, m=m)

    def checkpoint_nbytes(self) -> int:
        """Bytes of one full checkpoint of this model in the base's stored dtypes."""
        if hasattr(self.base, "nbytes"):  # lazy state dict: from the headers
            return int(self.base.nbytes())
        return sum(t.numel() * t.element_size() for t in (self.base[n] for n in self.names))


def genome_compatible(crossover: Any, mutation: Any) -> bool:
    """True when (crossover, mutation) -- registered names or operators built by the
    registries (their ``name``) -- keep every child in the compact genome family, as declared
    at registration (:func:`cycleqd.registry.svd_genome_compatible`: the one place it is
    decided). An unknown name or an operator without a registered name: False."""
    names = [x if isinstance(x, str) else getattr(x, "name", None) for x in (crossover, mutation)]
    return svd_genome_compatible(*names)


def _svd_names(registry: Registry) -> list[str]:
    return [n for n in registry if registry.declares_svd_genome(n)]   # registration order
