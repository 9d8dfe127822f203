"""Any lm-evaluation-harness task as a CycleQD skill (optional extra ``lmeval``: ``lm-eval``).

The adapter runs ``lm_eval.simple_evaluate`` on the model the run bound:

- an :class:`~cycleqd.inference.hf.HFBackend` is wrapped by lm-eval's own ``HFLM`` around the
  *already loaded* ``transformers`` model and tokenizer (no reload; weights swapped in place by
  ``load_weights`` are what lm-eval sees), so every output type works: ``generate_until``,
  ``loglikelihood`` (multiple choice) and ``loglikelihood_rolling``;
- any other :class:`~cycleqd.inference.base.GenerationBackend` (e.g. vLLM) is wrapped by
  :class:`BackendLM`, which supports ``generate_until`` tasks (the prompt is sent as one user
  message, or as the chat lm-eval built when ``apply_chat_template=True``);
- an ``lm_eval.api.model.LM`` instance is used as it is.

Scores: quality = the task's metric (must be higher-is-better and in [0, 1], e.g. ``acc``,
``exact_match``); outcomes = that metric per document (``"<task>/<doc_id>"``). For metrics
aggregated by the mean, outcomes are cached per sample (:class:`SampleCache`), and only
uncached documents are sent to lm-eval (its ``samples=`` argument). Tasks that execute
model-written code on the host (lm-eval's ``unsafe_code``, e.g. its ``humaneval``/``mbpp``)
are refused: use :class:`cycleqd.skills.coding.CodingSkill`, which runs code in bubblewrap.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cycleqd._checks import check_int
from cycleqd.errors import require
from cycleqd.registry import SKILLS
from cycleqd.skills.base import SkillResult
from cycleqd.skills.cache import SampleCache, item_key, model_key

_CHAT_MARK = "\x00cycleqd-chat\x00"

#: serialises lm-eval harness runs (process-wide seeds and logger level), see evaluate
_HARNESS_LOCK = threading.Lock()


def _require_lm_eval():
    require("lm_eval", "LMEvalSkill (lm-evaluation-harness)")


def _make_backend_lm_class():
    from lm_eval.api.model import LM

    class BackendLM(LM):
        """lm-eval ``LM`` over a :class:`GenerationBackend` (``generate_until`` only).

        Requests are grouped by their (stop strings, max_gen_toks) and each group is sent to
        ``backend.generate`` in one batched call; greedy decoding regardless of lm-eval's
        ``do_sample``/``temperature`` (CycleQD scores greedily).
        """

        def __init__(self, backend: Any, *, default_max_gen_toks: int = 256) -> None:
            super().__init__()
            self.backend = backend
            self.default_max_gen_toks = default_max_gen_toks

        @property
        def tokenizer_name(self) -> str:
            return "cycleqd-backend-" + type(self.backend).__name__

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            return "backend-chat-template" if chat_template else ""

        def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
            return _CHAT_MARK + json.dumps([{"role": m["role"], "content": m["content"]}
                                            for m in chat_history])

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            groups: dict[tuple, list[int]] = {}
            convs, keys = [], []
            for i, req in enumerate(requests):
                context, kwargs = req.args
                kwargs = dict(kwargs or {})
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                key = (tuple(u for u in until if u), int(kwargs.get("max_gen_toks",
                                                                   self.default_max_gen_toks)))
                if context.startswith(_CHAT_MARK):
                    conv = json.loads(context[len(_CHAT_MARK):])
                else:
                    conv = [{"role": "user", "content": context}]
                convs.append(conv)
                keys.append(key)
                groups.setdefault(key, []).append(i)
            out = [""] * len(requests)
            for (until, max_toks), idx in groups.items():
                replies = self.backend.generate([convs[i] for i in idx], max_new_tokens=max_toks,
                                                stop=list(until))
                for i, r in zip(idx, replies):
                    out[i] = r
            return out

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError(
                f"{type(self.backend).__name__} only generates text; loglikelihood/multiple-choice "
                "tasks need an HFBackend (wrapped by lm-eval's HFLM) or an lm-eval LM")

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError(
                f"{type(self.backend).__name__} only generates text; perplexity tasks need an "
                "HFBackend (wrapped by lm-eval's HFLM) or an lm-eval LM")

    return BackendLM


_TASK_LINE = re.compile(r"^(?:task|group|tag):\s*[\"']?([^\s\"'#]+)", re.M)


def _task_names_in_yaml(folders: Sequence[Path]) -> set[str]:
    """``task:``/``group:``/``tag:`` names written in the task YAMLs under ``folders`` (a text
    scan: ~2 s over lm-eval's ~14,000 files, where indexing them with ``TaskManager`` takes
    ~40 s on 2 cores). Tasks generated by code are not seen: see :func:`check_params`."""
    names: set[str] = set()
    for folder in folders:
        for dirpath, _, files in os.walk(folder):
            for f in files:
                if f.endswith((".yaml", ".yml")):
                    names.update(_TASK_LINE.findall(Path(dirpath, f).read_text(errors="ignore")))
    return names


def check_params(params: Mapping[str, Any]) -> None:
    """Config-time check of :class:`LMEvalSkill` parameters without any model: ``task`` is
    given, ``include_path`` folders exist, and a task *name* is known to lm-eval (looked up in
    the task YAMLs' text first; a name not found there is confirmed with lm-eval's own
    ``TaskManager`` index, which imports lm-eval and takes tens of seconds; a line on stderr
    says so).

    Raises:
        ValueError: ``<param>=<value>: <why>`` for a bad value or an unknown task (with a
            did-you-mean), or lm-eval not installed.
    """
    task = params.get("task")
    include = params.get("include_path")
    paths = [] if include is None else ([str(include)] if isinstance(include, (str, Path))
                                        else [str(p) for p in include])
    for p in paths:
        if not Path(p).expanduser().exists():
            raise ValueError(f"include_path={p!r}: does not exist")
    if not isinstance(task, str):
        return   # an inline task config: built (and checked) with the skill
    spec = importlib.util.find_spec("lm_eval")
    if spec is None:
        raise ValueError("task: lm-eval is not installed: pip install 'cycleqd[lmeval]' (or pip install lm-eval)")
    folders = [Path(p) for p in paths]
    if params.get("include_defaults", True):
        folders.append(Path(list(spec.submodule_search_locations)[0]) / "tasks")
    known = _task_names_in_yaml(folders)
    if task in known:
        return
    print(f"cycleqd: lm-eval task {task!r} is not in the task files; asking lm-eval's task index "
          "(imports lm-eval, ~1 min on 2 cores)", file=sys.stderr)
    from lm_eval.tasks import TaskManager

    all_tasks = TaskManager(include_path=paths or None,
                            include_defaults=params.get("include_defaults", True)).all_tasks
    if task not in all_tasks:
        close = difflib.get_close_matches(task, list(all_tasks), n=1, cutoff=0.6)
        raise ValueError(f"task={task!r}: unknown lm-eval task"
                         + (f" (did you mean {close[0]!r}?)" if close else "")
                         + (f" (not registered and not in include_path={paths})" if paths else ""))


def backend_lm(backend: Any, **kwargs: Any):
    """Wrap a GenerationBackend as an lm-eval ``LM`` (see :class:`BackendLM` above)."""
    _require_lm_eval()
    return _make_backend_lm_class()(backend, **kwargs)


@SKILLS.register("lmeval", source="EleutherAI lm-evaluation-harness (any registered or custom task)",
                 context=("name",), checker=check_params)
class LMEvalSkill:
    """An lm-evaluation-harness task as a skill.

    Args:
        task: a registered task name (``"arc_easy"``), a task in ``include_path``, or an inline
            task config dict (as in a task YAML, with a ``task`` key).
        metric: the metric used as quality (default: the task's first metric). Must be
            higher-is-better with values in [0, 1].
        filter_name: lm-eval filter whose metric is read (default ``"none"``, or the task's
            first filter).
        name: skill name (default: the task name).
        include_path: folder(s) of extra task YAMLs (custom tasks).
        limit: score only the first ``limit`` documents (fixed, not random).
        num_fewshot: few-shot examples (lm-eval's fixed seed 1234 picks them).
        apply_chat_template: render prompts with the model's chat template (lm-eval option).
        system_instruction: system message (lm-eval option).
        batch_size: batch size for lm-eval's ``HFLM``.
        cache: :class:`SampleCache` or path (used for mean-aggregated metrics).
        include_defaults: also index lm-eval's built-in tasks (False: only ``include_path``
            and inline configs; faster start).

    Raises:
        ImportError: lm-eval is not installed.
        ValueError: unknown task, unknown/not higher-is-better metric, an unsafe (code
            executing) task, bad limit -- all before any model work.
    """

    def __init__(self, task: str | Mapping[str, Any], *, metric: str | None = None,
                 filter_name: str | None = None, name: str | None = None,
                 include_path: str | Path | Sequence[str | Path] | None = None,
                 limit: int | None = None, num_fewshot: int | None = None,
                 apply_chat_template: bool = False, system_instruction: str | None = None,
                 batch_size: int = 16, cache: SampleCache | str | Path | None = None,
                 include_defaults: bool = True) -> None:
        _require_lm_eval()
        from lm_eval.tasks import TaskManager, get_task_dict

        check_int("limit", limit, optional=True)
        check_int("batch_size", batch_size)
        if isinstance(task, Mapping):
            if "task" not in task:
                raise ValueError("an inline lm-eval task config needs a 'task' key (its name)")
            self.task_name = str(task["task"])
            self._task_arg: Any = dict(task)
        elif isinstance(task, str) and task:
            self.task_name = task
            self._task_arg = task
        else:
            raise ValueError(f"task must be a task name or a task config dict, got {task!r}")
        paths = None
        if include_path is not None:
            paths = ([str(include_path)] if isinstance(include_path, (str, Path))
                     else [str(p) for p in include_path])
            for p in paths:
                if not Path(p).exists():
                    raise ValueError(f"include_path {p!r} does not exist")
        self.task_manager = TaskManager(include_path=paths, include_defaults=include_defaults)
        if isinstance(self._task_arg, str) and self._task_arg not in self.task_manager.all_tasks:
            raise ValueError(f"unknown lm-eval task {self._task_arg!r} (not registered and not in "
                             f"include_path={paths})")
        try:
            if hasattr(self.task_manager, "load"):  # lm-eval >= 0.4.10: flat dicts
                tasks = dict(self.task_manager.load([self._task_arg])["tasks"])
            else:
                tasks = _leaf_tasks(get_task_dict([self._task_arg], self.task_manager))
        except Exception as e:
            raise ValueError(f"lm-eval could not build task {self.task_name!r}: {e}") from e
        if len(tasks) != 1:
            raise ValueError(f"{self.task_name!r} is a group of {len(tasks)} tasks; give one task")
        (self.task_name, task_obj), = tasks.items()
        if getattr(task_obj, "UNSAFE_CODE", False) or getattr(task_obj.config, "unsafe_code", False):
            raise ValueError(f"lm-eval task {self.task_name!r} executes model-written code on the "
                             "host (unsafe_code); use cycleqd.skills.coding.CodingSkill instead")
        hib = task_obj.higher_is_better()
        metric = metric or next(iter(hib), None)
        if metric not in hib:
            raise ValueError(f"metric {metric!r} is not a metric of task {self.task_name!r} "
                             f"(it has {sorted(hib)})")
        if not hib[metric]:
            raise ValueError(f"metric {metric!r} of {self.task_name!r} is lower-is-better; a "
                             "skill quality must be higher-is-better in [0, 1]")
        self.metric = metric
        filters = [f.name for f in getattr(task_obj, "_filters", [])] or ["none"]
        self.filter_name = filter_name or ("none" if "none" in filters else filters[0])
        if self.filter_name not in filters:
            raise ValueError(f"filter {self.filter_name!r} not in the task's filters {filters}")
        from lm_eval.api.metrics import mean as _lm_mean
        self.per_sample_mean = task_obj.aggregation().get(metric) is _lm_mean
        docs = list(task_obj.eval_docs)
        self.n_docs = len(docs)
        if self.n_docs == 0:
            raise ValueError(f"task {self.task_name!r} has no evaluation documents")
        self.doc_ids = list(range(self.n_docs if limit is None else min(limit, self.n_docs)))
        self.output_type = task_obj.config.output_type
        self.name = name or self.task_name
        self.num_fewshot = num_fewshot
        self.apply_chat_template = bool(apply_chat_template)
        self.system_instruction = system_instruction
        self.batch_size = batch_size
        self.cache = SampleCache(cache) if isinstance(cache, (str, Path)) else cache
        cfg = {"task": task_obj.dump_config(), "metric": metric, "filter": self.filter_name,
               "fewshot": num_fewshot, "chat": self.apply_chat_template,
               "sys": system_instruction}
        # per-sample keys are the documents' content (a data file changed under the same task
        # config is other items); few-shot examples enter every prompt: their content is in
        # the skill key (documents without a canonical form switch the cache off)
        try:
            self._doc_keys = {d: item_key(docs[d]) for d in self.doc_ids}
            shots = num_fewshot if num_fewshot is not None else task_obj.config.num_fewshot
            if shots:
                cfg["fewshot_docs"] = item_key([list(task_obj.fewshot_docs() or []), docs])
        except TypeError:
            self._doc_keys = None
        digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
        self.cache_key = f"lmeval/{self.task_name}/{digest[:12]}"
        self._hflm = None

    def sample_id(self, doc_id: int) -> str:
        return f"{self.task_name}/{doc_id}"

    def _lm(self, model: Any):
        from lm_eval.api.model import LM

        if isinstance(model, LM):
            return model
        from cycleqd.inference.hf import HFBackend
        if isinstance(model, HFBackend):
            if self._hflm is None or self._hflm[0] is not model.model:
                from lm_eval.models.huggingface import HFLM
                lm = HFLM(pretrained=model.model, tokenizer=model.tokenizer,
                          batch_size=self.batch_size, device=str(model.device))
                self._hflm = (model.model, lm)
            return self._hflm[1]
        if callable(getattr(model, "generate", None)):
            if self.output_type != "generate_until":
                raise ValueError(f"task {self.task_name!r} is {self.output_type}; "
                                 f"{type(model).__name__} can only generate (use an HFBackend)")
            return backend_lm(model)
        raise ValueError(f"cannot evaluate a {type(model).__name__} with lm-eval: expected an "
                         "HFBackend, a GenerationBackend or an lm_eval LM")

    def _run_harness(self, simple_evaluate: Any, lm: Any, todo: list) -> dict:
        prev = logging.getLogger("lm_eval").level
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        try:
            return simple_evaluate(
                model=lm, tasks=[self._task_arg], task_manager=self.task_manager,
                samples={self.task_name: todo}, num_fewshot=self.num_fewshot,
                log_samples=True, bootstrap_iters=0,
                apply_chat_template=self.apply_chat_template,
                system_instruction=self.system_instruction, verbosity="ERROR")
        finally:
            logging.getLogger("lm_eval").setLevel(prev)

    def evaluate(self, model: Any) -> SkillResult:
        """Run the task on ``model`` (see the module docstring for what ``model`` may be).

        Raises:
            ValueError: the metric is missing from lm-eval's output or outside [0, 1].
        """
        from lm_eval import simple_evaluate

        lm = self._lm(model)
        fp = model_key(model)  # weights + backend (dtype, tokenizer, chat template)
        use_cache = (self.cache is not None and bool(fp) and self.per_sample_mean
                     and self._doc_keys is not None)
        ids = [self.sample_id(d) for d in self.doc_ids]
        keys = {self.sample_id(d): self._doc_keys[d] for d in self.doc_ids} if use_cache else {}
        hits = self.cache.get_many(fp, self.cache_key, keys) if use_cache else {}
        todo = [d for d, sid in zip(self.doc_ids, ids) if sid not in hits]
        new: dict[str, float] = {}
        aggregate = None
        if todo:
            # one harness run at a time: simple_evaluate sets process-wide state (seeds, the
            # logger level); concurrent skills (engine.step.evaluate_skills) still share the
            # generation pool's batch
            with _HARNESS_LOCK:
                res = self._run_harness(simple_evaluate, lm, todo)
            key = f"{self.metric},{self.filter_name}"
            aggregate = res["results"].get(self.task_name, {}).get(key)
            for s in res["samples"][self.task_name]:
                if s.get("filter", "none") != self.filter_name or self.metric not in s:
                    continue
                v = s[self.metric]
                v = float(v[0] if isinstance(v, (list, tuple)) else v)
                new[self.sample_id(int(s["doc_id"]))] = v
            if self.per_sample_mean:
                missing = [i for d, i in zip(self.doc_ids, ids) if d in todo and i not in new]
                if missing:
                    raise ValueError(f"lm-eval returned no {self.metric!r} for {missing[:3]}")
            bad = {k: v for k, v in new.items() if not (math.isfinite(v) and 0.0 <= v <= 1.0)}
            if bad:
                raise ValueError(f"metric {self.metric!r} of {self.task_name!r} is outside [0, 1]: "
                                 f"{list(bad.items())[:3]}")
            if use_cache:
                self.cache.put_many(fp, self.cache_key, new, items=keys)
        outcomes = {i: float(hits.get(i, new.get(i, 0.0))) for i in ids}
        if self.per_sample_mean or aggregate is None:
            quality = sum(outcomes.values()) / len(outcomes)
        else:
            quality = float(aggregate)
            if not 0.0 <= quality <= 1.0:
                raise ValueError(f"metric {self.metric!r} of {self.task_name!r} is {quality}, "
                                 "outside [0, 1]")
        return SkillResult(quality=quality, outcomes=outcomes)


def _leaf_tasks(tdict: Mapping) -> dict[str, Any]:
    """Flatten lm-eval's (possibly nested group) task dict into {task name: Task}."""
    out: dict[str, Any] = {}
    for k, v in tdict.items():
        if isinstance(v, Mapping):
            out.update(_leaf_tasks(v))
        elif v is not None:
            out[getattr(k, "task_name", None) or getattr(v, "task_name", None) or str(k)] = v
    return out


__all__ = ["LMEvalSkill", "backend_lm"]
