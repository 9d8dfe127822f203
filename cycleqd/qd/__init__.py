"""The QD loop's data: MAP-Elites archives, elite sampling, the CycleQD scheduler, metrics.
No torch and no models here."""

from cycleqd.qd.archive import BCAxis, Elite, GridArchive, make_archives
from cycleqd.qd.metrics import archive_stats, best_quality, coverage, qd_score
from cycleqd.qd.sampling import SCHEMES, sample_parents, selection_probabilities
from cycleqd.qd.scheduler import Ask, CycleQDScheduler, derive_seed

__all__ = ["BCAxis", "Elite", "GridArchive", "make_archives", "archive_stats", "best_quality",
           "coverage", "qd_score", "SCHEMES", "sample_parents", "selection_probabilities", "Ask",
           "CycleQDScheduler", "derive_seed"]
