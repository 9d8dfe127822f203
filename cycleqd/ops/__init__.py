"""Weight operators over task vectors tau = theta - theta_base (crossover, mutation,
genomes, aggregation). See docs/architecture.md. Importing this package registers every
built-in operator in :mod:`cycleqd.registry` without importing torch (bound lazily)."""

from cycleqd.registry import AGGREGATIONS, CROSSOVERS, MUTATIONS
from cycleqd.ops.base import Crossover, Mutation, TaskVector, TensorSelector, register
from cycleqd.ops.crossover import make_crossover
from cycleqd.ops.mutation import make_mutation
from cycleqd.ops.space import DenseWeightSpace, WeightSpace
from cycleqd.ops.genome import SVDGenome, SVDGenomeWeightSpace, genome_compatible
from cycleqd.ops.aggregation import aggregate

__all__ = ["CROSSOVERS", "MUTATIONS", "AGGREGATIONS", "Crossover", "Mutation", "TaskVector",
           "TensorSelector", "register", "make_crossover", "make_mutation", "DenseWeightSpace",
           "WeightSpace", "SVDGenome", "SVDGenomeWeightSpace", "genome_compatible", "aggregate"]
