"""Benchmark data sets: the catalogue (public sources pinned to commits, checksums) and
fetching missing files into the data dir (``cycleqd data list`` / ``cycleqd data fetch``)."""

from cycleqd.datasets.catalogue import (CATALOGUE, DEFAULT_DATASETS, DataFile, Dataset, datasets_for_skill,
                                        file_entry, mbpp_sanitized_to_jsonl, names_for_skills)
from cycleqd.datasets.fetch import (MIRROR_ENV, TIMEOUT_ENV, ChecksumError, DataError, DataMissingError,
                                    fetch, fetch_file, fetch_timeout, file_status, locate, missing_files,
                                    mirror, require, sha256_of, source_url)

__all__ = ["CATALOGUE", "DEFAULT_DATASETS", "DataFile", "Dataset", "datasets_for_skill", "file_entry",
           "mbpp_sanitized_to_jsonl", "names_for_skills", "MIRROR_ENV", "TIMEOUT_ENV", "ChecksumError",
           "DataError", "DataMissingError", "fetch", "fetch_file", "fetch_timeout", "file_status", "locate",
           "missing_files", "mirror", "require", "sha256_of", "source_url"]
