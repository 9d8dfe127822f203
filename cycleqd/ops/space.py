"""WeightSpace: the engine's one handle on weights.

It owns theta_base, the experts' genomes, the operators, and the genome representation
(dense task vectors here; compact SVD genomes in :mod:`cycleqd.ops.genome`). The engine
treats genomes as opaque: it asks for crossover, mutation, materialisation, save, load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import torch
from safetensors.torch import load_file, save_file

from cycleqd.ops.base import Crossover, Mutation, TaskVector, apply_task_vector


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

    def crossover(self, parents: Sequence[Any], generator: torch.Generator) -> Any: ...

    def mutate(self, genome: Any, skill: int, generator: torch.Generator) -> Any: ...

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

    Args:
        base: theta_base, name -> tensor (any float dtype; kept as stored).
        experts: the K experts' task vectors, in skill order.
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

    def crossover(self, parents, generator):
        return self._crossover(parents, generator=generator)

    def mutate(self, genome, skill, generator):
        return self._mutation(genome, skill=skill, generator=generator)

    def materialize(self, genome: TaskVector) -> dict[str, torch.Tensor]:
        return apply_task_vector(self.base, genome)

    def task_vector(self, genome: TaskVector) -> TaskVector:
        return genome

    def save(self, genome: TaskVector, path: Path) -> int:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in genome.items()}, str(tmp))
        tmp.replace(path)
        return path.stat().st_size

    def load(self, path: Path) -> TaskVector:
        """Read a genome written by :meth:`save`, tensors in the base's order."""
        loaded = load_file(str(path))
        return {k: loaded[k] for k in self.base}
