"""Weight operators over task vectors tau = theta - theta_base (crossover, mutation,
genomes, aggregation). See docs/architecture.md."""

from cycleqd.ops.base import CROSSOVERS, MUTATIONS, Crossover, Mutation, TaskVector, register
from cycleqd.ops.space import DenseWeightSpace, WeightSpace
from cycleqd.ops import crossover as _crossover, mutation as _mutation  # noqa: F401  (fill the registries)

__all__ = ["CROSSOVERS", "MUTATIONS", "Crossover", "Mutation", "TaskVector", "register",
           "DenseWeightSpace", "WeightSpace"]
