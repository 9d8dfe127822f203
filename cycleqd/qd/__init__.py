"""The QD loop's data: MAP-Elites archives, elite sampling, the CycleQD scheduler, metrics.
No torch and no models here."""

from cycleqd.qd.archive import ArchiveGate, BCAxis, Elite, GridArchive, enters, make_archives
from cycleqd.qd.metrics import archive_stats, best_quality, coverage, qd_score
from cycleqd.qd.sampling import SCHEMES, sample_parents, selection_probabilities
from cycleqd.qd.scheduler import Ask, CycleQDScheduler, derive_seed

__all__ = ["ArchiveGate", "BCAxis", "Elite", "GridArchive", "enters", "make_archives", "archive_stats",
           "best_quality", "coverage", "qd_score", "SCHEMES", "sample_parents", "selection_probabilities", "Ask",
           "CycleQDScheduler", "derive_seed"]
