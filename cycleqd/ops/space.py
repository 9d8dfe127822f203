"""WeightSpace: the engine's one handle on weights.

It owns theta_base, the experts' genomes, the operators, and the genome representation
(dense task vectors here; compact SVD genomes in :mod:`cycleqd.ops.genome`). The engine
treats genomes as opaque: it asks for crossover, mutation, materialisation, save, load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

from cycleqd._lazy import lazy_import
from cycleqd.ops.base import Crossover, Mutation, TaskVector, apply_task_vector, with_params

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")
_st = lazy_import("safetensors.torch")   # imports torch: bound on first use


def load_file(filename: str, device: str = "cpu") -> dict:
    """``safetensors.torch.load_file``, imported on first use (it imports torch)."""
    return _st.load_file(filename, device=device)


def save_file(tensors: Mapping[str, torch.Tensor], filename: str, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file``, imported on first use (it imports torch)."""
    _st.save_file(tensors, filename, metadata=metadata)


@runtime_checkable
class WeightSpace(Protocol):
    """Genomes and the operators over them (see docs/architecture.md)."""

    genome_suffix: str

    def expert_genomes(self) -> list[Any]:
        """One genome per skill, in skill order (the experts' task vectors)."""
        ...

    def base_genome(self) -> Any:
        """The base model's genome (zero task vector)."""
        ...

    def crossover(self, parents: Sequence[Any], generator: torch.Generator, *,
                  params: Mapping[str, float] | None = None) -> Any:
        """Merge ``parents``; ``params`` overrides the operator's settings for this call
        (:func:`cycleqd.ops.base.with_params`)."""
        ...

    def mutate(self, genome: Any, skill: int, generator: torch.Generator, *,
               params: Mapping[str, float] | None = None) -> Any:
        """Mutate along expert ``skill``'s basis; ``params`` as for :meth:`crossover`."""
        ...

    def materialize(self, genome: Any) -> dict[str, torch.Tensor]:
        """Full weights theta = theta_base + tau(genome), in the base's stored dtypes."""
        ...

    def task_vector(self, genome: Any) -> TaskVector: ...

    def save(self, genome: Any, path: Path) -> int:
        """Write the genome to ``path`` atomically; returns bytes written."""
        ...

    def load(self, path: Path) -> Any: ...


class DenseWeightSpace:
    """Genomes are dense fp32 task vectors; any registered crossover/mutation applies.

    Memory: one fp32 copy of the model per genome held (4 bytes/parameter; SmolLM2-135M
    0.54 GB, Llama-3-8B 32 GB -- for 8B models prefer :class:`~cycleqd.ops.genome.SVDGenomeWeightSpace`).
    Stored genomes are fp32 safetensors of the task vector (the same size).

    Args:
        base: theta_base, name -> tensor (any float dtype; kept as stored).
        experts: the K experts' task vectors, in skill order (fp32).
        crossover, mutation: operators from :data:`cycleqd.ops.CROSSOVERS` /
            :data:`cycleqd.ops.MUTATIONS`.
    """

    genome_suffix = ".safetensors"

    def __init__(self, base: Mapping[str, torch.Tensor], experts: Sequence[TaskVector],
                 crossover: Crossover, mutation: Mutation):
        self.base = dict(base)
        self.experts = list(experts)
        self._crossover, self._mutation = crossover, mutation

    def expert_genomes(self) -> list[TaskVector]:
        return self.experts

    def base_genome(self) -> TaskVector:
        return {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in self.base.items()}

    def crossover(self, parents, generator, *, params=None):
        return with_params(self._crossover, params)(parents, generator=generator)

    def mutate(self, genome, skill, generator, *, params=None):
        return with_params(self._mutation, params)(genome, skill=skill, generator=generator)

    def materialize(self, genome: TaskVector) -> dict[str, torch.Tensor]:
        return apply_task_vector(self.base, genome)

    def task_vector(self, genome: TaskVector) -> TaskVector:
        return genome

    def iter_materialized(self, genome: TaskVector):
        """Yield (name, theta tensor) one tensor at a time (base order, base's dtype)."""
        for k, v in self.base.items():
            yield k, ((v.float() + genome[k].float()).to(v.dtype) if k in genome else v)

    def save(self, genome: TaskVector, path: Path) -> int:
        path = Path(path)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        save_file({k: v.float().contiguous() for k, v in genome.items()}, str(tmp),
                  metadata={"format": "cycleqd-task-vector/1"})
        os.replace(tmp, path)
        return path.stat().st_size

    def load(self, path: Path) -> TaskVector:
        """Raises ValueError (naming the file) for a missing/corrupt file or wrong tensors."""
        try:
            tv = load_file(str(path))
        except Exception as e:
            raise ValueError(f"cannot read task-vector checkpoint {path}: {e}") from e
        missing = [k for k in self.base if k not in tv]
        if missing:
            raise ValueError(f"{path}: task vector lacks tensor {missing[0]!r} "
                             f"({len(missing)} missing)")
        return {k: tv[k] for k in self.base}

    def checkpoint_nbytes(self) -> int:
        """Bytes of one full checkpoint of this model in the base's stored dtypes."""
        return sum(t.numel() * t.element_size() for t in self.base.values())


def collect_garbage(directory: Path | str, referenced: Iterable[Path | str], *, suffix: str,
                    dry_run: bool = False) -> list[Path]:
    """Delete genome files in ``directory`` ending in ``suffix`` that are not in
    ``referenced`` (e.g. the union of all archives' elites). Temp files from interrupted
    writes (``*.tmp-<pid>``) are removed too. Returns the deleted paths.

    Only call it after the archive that references the survivors has been saved, so a
    crash in between never loses a referenced genome.
    """
    directory = Path(directory)
    keep = {Path(p).resolve() for p in referenced}
    deleted = []
    if not directory.is_dir():
        return deleted
    for p in sorted(directory.iterdir()):
        if not p.is_file():
            continue
        stale_tmp = ".tmp-" in p.name and not _pid_alive(p.name.rsplit(".tmp-", 1)[1])
        if (p.name.endswith(suffix) and p.resolve() not in keep) or stale_tmp:
            if not dry_run:
                p.unlink(missing_ok=True)
            deleted.append(p)
    return deleted


def _pid_alive(pid: str) -> bool:
    """True if ``pid`` (a string) names a running process (a write may be in progress)."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
