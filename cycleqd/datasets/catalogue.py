"""The benchmark data sets cycleqd knows: where each file lives in the data dir, its public
source pinned to a commit, and the checksum of the stored bytes.

The data dir (:func:`cycleqd.paths.data_dir`) has one layout everywhere: this workplace's
``../shared/data``, a user's ``<cache>/data`` after ``cycleqd data fetch``, and a mirror
(``$CYCLEQD_DATA_MIRROR``) all hold ``<rel>`` below their root.

``sha256``/``size`` are of the bytes as stored in the data dir. They equal the upstream bytes,
except where a file has a ``convert`` step (MBPP: upstream is one JSON array with the fields
``prompt``/``test_imports``/``source_file``; stored is JSONL with ``text``/``test_setup_code``,
see :func:`mbpp_sanitized_to_jsonl`), whose output is what is checked. Files that exist upstream
only in a form that cannot be decoded safely here (a pickle) have no public URL: they come
from a mirror only (``mirror_only`` says why).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable

_GR = "https://raw.githubusercontent.com/google-research/google-research/"
_AB = "https://raw.githubusercontent.com/THUDM/AgentBench/"
_CQD = "https://raw.githubusercontent.com/SakanaAI/CycleQD/"
_CQD_COMMIT = "e5ccb24b054b9b3167425ea56630b81ceb6189a2"


def mbpp_sanitized_to_jsonl(raw: bytes) -> bytes:
    """Convert google-research's ``sanitized-mbpp.json`` (a JSON array; also accepts JSONL
    already in the stored form, so the step is idempotent) into the stored JSONL: one
    ``json.dumps`` line per record with ``task_id``, ``text`` (upstream ``prompt``), ``code``,
    ``test_list``, ``test_setup_code`` (``""``; the loader derives the imports the asserts
    need, :func:`cycleqd.skills.coding.data.mbpp_test_imports`).

    Raises:
        ValueError: not JSON/JSONL, or a record lacks ``task_id``/``code``/``test_list``.
    """
    text = raw.decode("utf-8").strip()
    rows = json.loads(text) if text.startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    out = []
    for r in rows:
        if not isinstance(r, dict) or not {"task_id", "code", "test_list"} <= r.keys():
            raise ValueError("not an MBPP record (task_id, code, test_list)")
        out.append(json.dumps({"task_id": r["task_id"], "text": r.get("text", r.get("prompt")),
                               "code": r["code"], "test_list": r["test_list"],
                               "test_setup_code": r.get("test_setup_code", "")}) + "\n")
    return "".join(out).encode("utf-8")


@dataclass(frozen=True)
class DataFile:
    """One file of a data set.

    Attributes:
        rel: path below the data dir (``mbpp/sanitized-mbpp.jsonl``).
        url: public source pinned to a commit, or ``None`` (mirror only).
        sha256: hex SHA-256 of the stored bytes (after ``convert``).
        size: stored size in bytes.
        convert: bytes -> bytes applied to the download before the check, or ``None``.
        mirror_only: why there is no public URL (empty when there is one).
    """

    rel: str
    url: str | None
    sha256: str
    size: int
    convert: Callable[[bytes], bytes] | None = None
    mirror_only: str = ""


@dataclass(frozen=True)
class Dataset:
    """A named data set: its files, licence, and the skill types that read it."""

    name: str
    description: str
    licence: str
    files: tuple[DataFile, ...]
    skills: tuple[str, ...] = ()


CATALOGUE: dict[str, Dataset] = {d.name: d for d in (
    Dataset("mbpp", "MBPP sanitized, 427 problems (Austin et al. 2021)", "CC BY 4.0", (
        DataFile("mbpp/sanitized-mbpp.jsonl",
                 _GR + "30adf0ec5f35f9609c2f1d896005e184195d9146/mbpp/sanitized-mbpp.json",
                 "2bd0fe8c81ce55b06d993a75841ea950c25015bdd941a9696049daf6b9cb863a", 226764,
                 convert=mbpp_sanitized_to_jsonl),), skills=("mbpp", "mbppplus")),
    Dataset("dbbench", "AgentBench DB-Bench standard set, 300 items", "Apache-2.0", (
        DataFile("dbbench/standard.jsonl",
                 _AB + "c2bd5f7b604ec725aca25412f31d005dc42281dd/data/dbbench/standard.jsonl",
                 "cf8dec6fb8051f46e6171136824aaa8b8707c3affbb3185c0bad2b39bc6b71e2", 910356),),
            skills=("dbbench",)),
    Dataset("os", "AgentBench OS interaction: 1000 training tasks, 26 dev tasks", "Apache-2.0", (
        DataFile("os_interaction/training.json",
                 _AB + "5bf4eb27f05bc50ca97dce45f0693c6018875c25/data/os_interaction/train_0317/training.json",
                 "35cbd6cc07646eab32161d64260bbcc4d0cab145a7caae69c236320a9d7c7685", 1664159),
        DataFile("os_interaction/dev.json",
                 _AB + "f36853f68ace51dd3168478f975ec09be22d96e3/data/os_interaction/data/dev.json",
                 "c5554248e6c1cb606e27d2f81025b751a490c9a5ccd37aabf4c86879a52e9274", 16209)),
            skills=("os",)),
    Dataset("mbppplus", "MBPP+ (EvalPlus), 399 problems; the official protocol's coding set",
            "Apache-2.0", (
        DataFile("mbppplus/MbppPlus.jsonl",
                 "https://github.com/evalplus/evalplus/raw/038088e/MbppPlus.jsonl",
                 "08405a4e8764a4941cfe0945d25a956355a0454f364ea902c4020a44e7057973", 2733811),),
            skills=("mbppplus",)),
    Dataset("official-db", "CycleQD official DB set: DB-Bench standard + 60 dev items (360 rows)",
            "Apache-2.0", (
        DataFile("cycleqd-official/dbbench_standard_dev.jsonl",
                 _CQD + _CQD_COMMIT + "/evaluation/fishfarm/data/db/data_dbbench_standard_dev.jsonl",
                 "1065651d07b63693435a60460e6a6bfc3cc0512df2d8252f7fff3c93a12284bc", 1099236),),
            skills=("dbbench:official",)),
    Dataset("official-os", "CycleQD official OS search samples (110 tasks)", "Apache-2.0", (
        DataFile("cycleqd-official/os_search_samples.json", None,
                 "dd3b51b10c74065ff0f74cafc1d252ec92bfab9893d85ffe7f46bbcbb0cb993a", 397225,
                 mirror_only="upstream is a pickle (evaluation/fishfarm/data/os_interaction/configs/"
                             "samples.pkl), never unpickled here"),),
            skills=("os:official",)),
    Dataset("official-ids", "CycleQD official search ids (DB rows, OS sample indices)", "Apache-2.0", (
        DataFile("cycleqd-official/search_ids.json", None,
                 "c64ca3e45088c41f29871aa8720167f3e537027d74b04221c70684a234e769a0", 2119,
                 mirror_only="upstream has them only as Python lists in tasks/agentbench_db.py "
                             "and tasks/agentbench_os.py"),),
            skills=("dbbench:official", "os:official")),
)}

#: what ``cycleqd data fetch`` without names and ``cycleqd demo`` need
DEFAULT_DATASETS = ("mbpp", "dbbench", "os")


def datasets_for_skill(skill_type: str, protocol: str = "project") -> tuple[str, ...]:
    """Names of the data sets a skill type reads from the data dir (``()`` for types that
    bring their own data: humaneval, synthetic, ...). ``protocol="official"`` (the agent
    skills' official CycleQD protocol) reads the sets declared for ``"<type>:official"``
    (e.g. ``dbbench:official`` -> official-db, official-ids) instead of the project's."""
    key = skill_type if protocol in (None, "project") else f"{skill_type}:{protocol}"
    return tuple(d.name for d in CATALOGUE.values() if key in d.skills)


def names_for_skills(skills: Iterable[Any]) -> list[str]:
    """The data sets a run's skills read from the data dir, in order, without repeats.

    Args:
        skills: objects with ``type`` and ``params`` (run or demo skill configs); a skill
            whose params set ``data_path`` brings its own file and needs nothing.
    """
    names = (n for s in skills if "data_path" not in (s.params or {})
             for n in datasets_for_skill(s.type, (s.params or {}).get("protocol", "project")))
    return list(dict.fromkeys(names))


def file_entry(rel: str) -> tuple[Dataset, DataFile]:
    """The data set and catalogue entry of a data-dir path. Raises KeyError if unknown."""
    for d in CATALOGUE.values():
        for f in d.files:
            if f.rel == rel:
                return d, f
    raise KeyError(f"{rel} is not in the data catalogue")
