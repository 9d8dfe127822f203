"""Model adapters: turn a child's full weights (or its genome) into what the skills evaluate."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Mapping, Protocol, runtime_checkable

import torch

from cycleqd.inference.fingerprint import fingerprint_state_dict


@runtime_checkable
class ModelAdapter(Protocol):
    """``bind(weights, fingerprint)`` loads theta (name -> tensor, base's names/shapes) and
    returns the object passed to every ``Skill.evaluate`` for this model."""

    def bind(self, weights: Mapping[str, torch.Tensor], fingerprint: str) -> Any: ...


#: extra cost of a factored forward over a dense one on CPU, as a fraction of the dense
#: forward (``benchmarks/lowrank_bench.py``: factored forwards ran at 0.74-0.88 of the
#: materialised model's speed on SmolLM2-135M / the tiny model); the ``auto`` policy's
#: cost model uses the upper end
FACTORED_OVERHEAD = 0.3

#: float16 range: the engine rejects children with a weight beyond it (step.non_finite_weights)
_MAX_ABS = 65504.0


class LLMAdapter:
    """Loads weights into one long-lived generation backend (HF transformers or vLLM) in
    place, as the official code does with vLLM, and hands the backend to the skills.

    Args:
        backend: the generation backend.
        lowrank: ``"off"`` (always materialise), ``"on"`` (evaluate compact SVD genomes
            without materialising them, :meth:`bind_genome`, whenever exact: an HF backend
            on the CPU and a space whose children are fully factored), or ``"auto"`` (as
            ``"on"``, but only when the cost model says it pays: see :meth:`bind_genome`).
    Raises:
        ValueError: unknown ``lowrank``.
    """

    def __init__(self, backend: Any, *, lowrank: str = "off"):
        if lowrank not in ("off", "on", "auto"):
            raise ValueError(f"lowrank must be 'off', 'on' or 'auto', got {lowrank!r}")
        self.backend = backend
        self.lowrank = lowrank
        self._lr: Any = None                 # LowRankChildren over the backend's model
        self._lr_space: Any = None           # the space it was built for
        self._lr_ok = False                  # that space is fully factored
        self._lr_meta: dict[str, Any] = {}   # bounds and identity of the space
        self._base_loaded = False            # the backend holds space.base (no child)
        #: cost-model state of ``auto``: seconds of the last materialised bind (materialise
        #: + finite check + fingerprint + weight copy) and of the last child's evaluation
        self.last_bind_s: float | None = None
        self.last_eval_s: float | None = None
        self.n_factored = 0

    @classmethod
    def from_config(cls, backend_cfg: Any, info: Any) -> "LLMAdapter":
        """Args:
            backend_cfg: :class:`cycleqd.config.BackendConfig`.
            info: the weight space's model info (``model_dir``: HF folder of the base with
                config and tokenizer).
        """
        model_dir = getattr(info, "model_dir", info)
        lowrank = getattr(backend_cfg, "lowrank", "off")
        if backend_cfg.type == "vllm":
            from cycleqd.inference.vllm_backend import VLLMBackend

            dtype = "bfloat16" if backend_cfg.dtype == "auto" else backend_cfg.dtype
            return cls(VLLMBackend(str(model_dir), dtype=dtype,
                                   gpu_memory_utilization=backend_cfg.gpu_memory_utilization),
                       lowrank="off" if lowrank == "auto" else lowrank)
        from cycleqd.inference.hf import HFBackend

        dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}[backend_cfg.dtype]
        return cls(HFBackend.from_pretrained(str(model_dir), device=backend_cfg.device, dtype=dtype,
                                             batch_size=backend_cfg.batch_size), lowrank=lowrank)

    def bind(self, weights: Mapping[str, torch.Tensor], fingerprint: str) -> Any:
        """Copy ``weights`` into the backend (any factored child is removed first)."""
        if self._lr is not None:
            self._lr.remove()
        self._base_loaded = False
        self.backend.load_weights(weights, fingerprint)
        return self.backend

    # ------------------------------------------------------------------ factored children
    def bind_genome(self, space: Any, genome: Any) -> tuple[Any, str] | None:
        """Bind ``genome`` without materialising it, when that is exact and (``auto``) pays.

        The backend keeps theta_base and every ``nn.Linear`` adds the child's low-rank delta
        in its forward (:class:`~cycleqd.inference.lowrank.LowRankChildren`, equation (1) of
        docs/lowrank.md): no materialisation, no weight copy, no fingerprint pass over the
        weights. Used only when

        * ``lowrank`` is ``"on"``/``"auto"``, the backend is an HF backend on the CPU, the
          space a compact SVD space and ``genome`` an :class:`~cycleqd.ops.genome.SVDGenome`;
        * the space is fully factored (LoRA experts covered by the mutation's bases:
          logits equal the materialised child's within fp32 rounding, tested);
        * every weight provably stays finite and within the float16 range (a bound from
          the coefficients and the factors' largest entries; otherwise the engine's exact
          check on the materialised weights decides);
        * ``auto`` only: the last materialised bind cost more than
          :data:`FACTORED_OVERHEAD` x the last child's evaluation time (the factored
          forward is slower per pass; what it saves is the bind), so short evaluations
          (few tokens per child) go factored and long generations keep materialising.

        Returns:
            (the bound backend, the child's fingerprint) or None (the caller materialises).
            The fingerprint is ``"lr-"`` + a hash of the base, the experts, the mutation's
            basis settings and the genome's coefficients: the child's outcomes are cached
            under it, apart from the materialised weights' (the two forwards round
            differently).
        """
        if self.lowrank == "off":
            return None
        from cycleqd.ops.genome import SVDGenome, SVDGenomeWeightSpace

        model = getattr(self.backend, "model", None)
        if not (isinstance(space, SVDGenomeWeightSpace) and isinstance(genome, SVDGenome)
                and isinstance(model, torch.nn.Module) and callable(getattr(self.backend, "prompt_ids", None))
                and getattr(self.backend, "device", torch.device("cpu")).type == "cpu"):
            return None
        if self.lowrank == "auto" and not self._pays():
            return None
        if not self._prepare(space):
            return None
        if not self._finite_bound(space, genome):
            return None
        if not self._base_loaded:
            self._lr.remove()
            self.backend.load_weights(space.base, self._lr_meta["base_fp"])
            self._base_loaded = True
        fp = self.genome_fingerprint(genome)
        self._lr.set_children([genome])
        self.backend.fingerprint = fp
        self.n_factored += 1
        return self.backend, fp

    def _pays(self) -> bool:
        if self.last_bind_s is None or self.last_eval_s is None:
            return False   # nothing measured yet: materialise the first child
        return self.last_bind_s > FACTORED_OVERHEAD * self.last_eval_s

    def record(self, timings: Mapping[str, float], factored: bool) -> None:
        """Feed one evaluated child's timings (``score_child``'s) to the ``auto`` policy."""
        if "eval_s" in timings:
            self.last_eval_s = float(timings["eval_s"]) * ((1 + FACTORED_OVERHEAD) ** -1 if factored else 1.0)
        if not factored and "materialize_s" in timings:
            self.last_bind_s = sum(float(timings.get(k, 0.0)) for k in
                                   ("materialize_s", "finite_check_s", "fingerprint_s", "bind_s"))

    def _prepare(self, space: Any) -> bool:
        """Build the factored model for ``space`` once; False if it is not fully factored."""
        if self._lr_space is space:
            return self._lr_ok
        from cycleqd.inference.lowrank import LowRankChildren

        if self._lr is not None:
            self._lr.remove()
        self._lr_space, self._lr_ok, self._lr = space, False, None
        lr = LowRankChildren(self.backend.model, space)
        if not lr.fully_factored:
            return False
        self._lr, self._lr_ok = lr, True
        mut = space._mutation
        fps = list(getattr(mut, "fingerprints", []) or [])
        if len(fps) != space.K or any(f is None for f in fps):
            fps = [fingerprint_state_dict(e) for e in space.experts]
        ident = {"v": 1, "base": fingerprint_state_dict(space.base), "experts": fps,
                 "mutation": [type(mut).__name__, getattr(mut, "rank", None), getattr(mut, "svd_tol", None),
                              getattr(mut, "svd_method", None), repr(getattr(mut, "select", None))],
                 "factors": [lr.svd_tol, lr.resid_tol]}
        bounds = {}
        for mname, (mod, f) in lr.linears.items():
            w0 = float(space.base[f.name].abs().max())   # theta_base's, not what the model holds now
            tau = [float(space.experts[k][f.name].abs().max()) for k in range(space.K)]
            fac = {}
            if f.U is not None:
                for k, s0, r in f.spans:
                    fac[k] = (s0, r, float(f.U[:, s0:s0 + r].abs().max()) * float(f.V[s0:s0 + r].abs().max()))
            bounds[f.name] = (w0, tau, fac, f.S)
            bname = lr._lin_bias.get(mname)
            if bname is not None:
                bounds[bname] = (float(space.base[bname].abs().max()),
                                 [float(space.experts[k][bname].abs().max()) for k in range(space.K)], {}, None)
        self._lr_meta = {"ident": json.dumps(ident, sort_keys=True), "base_fp": ident["base"],
                         "bounds": bounds}
        self._base_loaded = False
        return True

    def _finite_bound(self, space: Any, genome: Any) -> bool:
        """Every weight of the child is finite and within +-65504 (sufficient bound)."""
        c = genome.c.double()
        if not bool(torch.isfinite(c).all()) or any(not bool(torch.isfinite(t).all()) for t in genome.m.values()):
            return False
        for name, (w0, tau, fac, S) in self._lr_meta["bounds"].items():
            b = w0 + sum(abs(float(c[k])) * tau[k] for k in range(len(tau)))
            m = genome.m.get(name)
            if m is not None:
                for k, (s0, r, uv) in fac.items():
                    L = min(r, m.shape[1])
                    b += uv * float((S[s0:s0 + L] * m[k, :L].abs()).sum())
            if not math.isfinite(b) or b > _MAX_ABS:
                return False
        return True   # other tensors: no expert changes them (fully factored), base is finite

    def genome_fingerprint(self, genome: Any) -> str:
        """Identity of a factored child: base, experts, bases' settings and coefficients."""
        h = hashlib.sha256(self._lr_meta["ident"].encode())
        h.update(genome.c.double().contiguous().numpy().tobytes())
        for name in sorted(genome.m):
            t = genome.m[name].float().contiguous()
            h.update(name.encode() + str(tuple(t.shape)).encode() + t.numpy().tobytes())
        return "lr-" + h.hexdigest()[:32]

    def close(self) -> None:
        if self._lr is not None:
            self._lr.remove()
        close = getattr(self.backend, "close", None)
        if close:
            close()
