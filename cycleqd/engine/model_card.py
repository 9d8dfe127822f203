"""The model card (``README.md``) of a model exported from a CycleQD run.

Hugging Face model-card format (https://huggingface.co/docs/hub/model-cards): YAML front
matter (``base_model`` for hub ids only, ``tags``, ``library_name``, ``license`` when the
base's own card states one), then what the model is (elite id, archives and cells, or the
aggregate and its sources), its lineage (every recorded ancestor back to the seed models:
generation, archive whose quality it was bred for, parents, search-split scores), its scores
(search split from ``metrics.jsonl``; held-out test scores only where a ``cycleqd demo``
recorded them in ``comparison.json`` beside the run), for the aggregate how it was chosen
(``final.json``: the strategy, every candidate's validation scores, the rule; see
:mod:`cycleqd.engine.final`), the run's ``config.yaml`` and config fingerprint, and the
method reference. Every number is read from the run directory; nothing
is estimated.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import yaml

import cycleqd
from cycleqd.engine.rundir import RunDir

TAGS = ("cycleqd", "merge", "model-merging", "quality-diversity")
LINEAGE_ROWS = 200   # ancestors listed in the table; the rest are counted
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_id(spec: Any) -> str | None:
    """``spec`` when it names a hub repository (``org/name``, not an existing local path)."""
    s = str(spec)
    return s if _HUB_ID.match(s) and not Path(s).expanduser().exists() else None


def _base_license(base_dir: Path | None, base: Any) -> str | None:
    """``license`` from the front matter of the base's README.md (its folder or local spec)."""
    for d in (base_dir, Path(str(base)).expanduser() if base else None):
        readme = d / "README.md" if d is not None else None
        if readme is None or not readme.is_file():
            continue
        text = readme.read_text(errors="replace")
        if text.startswith("---"):
            try:
                meta = yaml.safe_load(text.split("---", 2)[1]) or {}
            except yaml.YAMLError:
                continue
            if isinstance(meta, dict) and meta.get("license"):
                return str(meta["license"])
    return None


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))


def _scores_row(scores: dict | None, skills: Sequence[str]) -> list[str]:
    sc = scores or {}
    vals = [sc.get(s) for s in skills]
    mean = sum(vals) / len(vals) if vals and all(isinstance(v, (int, float)) for v in vals) else None
    return [_fmt(v) for v in vals] + [_fmt(mean)]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def load_comparison(run_dir: Path) -> dict | None:
    """``comparison.json`` that ``cycleqd demo`` writes beside the run directory, or None
    (missing or unreadable)."""
    path = Path(run_dir).parent / "comparison.json"
    if not path.is_file():
        return None
    try:
        comp = json.loads(path.read_text())
        return comp if isinstance(comp, dict) else None
    except ValueError:
        return None


def _test_scores(run_dir: Path, model_id: str, comp: dict | None = None) -> dict | None:
    """Held-out test scores that ``cycleqd demo`` recorded for this model (its
    ``comparison.json`` sits beside the run directory; ``comp``: already loaded by
    :func:`load_comparison`), else None."""
    comp = comp if comp is not None else load_comparison(run_dir)
    if comp is None:
        return None
    try:
        rows = {r["id"]: r for r in comp["rows"]}
    except (KeyError, TypeError):
        return None
    if model_id == "aggregate":
        row = rows.get("cycleqd:aggregate")
    else:
        row = rows.get(model_id)
        for skill, a in (comp.get("archives") or {}).items():
            if row is None and isinstance(a, dict) and a.get("best") == model_id:
                row = rows.get(f"cycleqd:best-{skill}")
    return row.get("scores") if row else None


def load_final(run_dir: Path) -> dict | None:
    """The run's ``final.json`` (the final-model record of :func:`cycleqd.engine.final.select_final`),
    or None (missing, unreadable or not a record)."""
    path = Path(run_dir) / "final.json"
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("candidates"), list) else None


def _label(row: dict) -> str:
    """A strategy's own candidate, as recorded (``lambda=0.6``, ``weights=[...]``, ``archive=1, rank=0``)."""
    return ", ".join(f"{k}={[round(x, 4) for x in v] if isinstance(v, list) else _fmt(v)}"
                     for k, v in row.items() if not k.startswith("validation"))


def _final_section(rec: dict, skills: Sequence[str]) -> list[str]:
    """The ``How it was chosen`` section from a ``final.json`` record (every value read from it)."""
    cands = [c for c in rec["candidates"] if isinstance(c, dict)]
    out = ["\n## How the final model was chosen\n"]
    split = rec.get("split")
    if len(cands) > 1:
        out.append(f"Final-model strategy `{rec.get('strategy')}`: {len(cands)} candidates were built from "
                   f"the archives' best models and scored on the {split or '?'} split; chosen: "
                   f"`{rec.get('chosen')}` (rule: {rec.get('rule', '?')}).\n")
    else:
        out.append(f"Final-model strategy `{rec.get('chosen')}` ({rec.get('rule', 'the configured strategy')})"
                   + (f"; its {split}-split scores are recorded, not used to choose." if split else ".") + "\n")
    if split:
        rows = []
        for c in cands:
            params = ", ".join(f"{k}={v}" for k, v in (c.get("params") or {}).items()) or "-"
            mark = "**chosen**" if c.get("strategy") == rec.get("chosen") else ""
            rows.append([f"`{c.get('strategy')}`", params] + _scores_row(c.get("validation"), skills)[:-1]
                        + [_fmt(c.get("validation_mean")), mark])
        out.append(_table(["strategy", "params"] + [f"{s} ({split})" for s in skills]
                          + [f"{split} mean", ""], rows))
    notes = []
    for c in cands:
        inner = c.get("search") or {}
        rows = inner.get("candidates") or []
        if isinstance(inner.get("chosen"), int) and 0 <= inner["chosen"] < len(rows):
            notes.append(f"- `{c.get('strategy')}` chose {_label(rows[inner['chosen']])} among {len(rows)} "
                         f"candidates ({inner.get('rule', '?')}).")
    if notes:
        out.append("\nEach strategy's own choice, on the same split:\n\n" + "\n".join(notes))
    return out


def model_card(run_dir: Path | str, model_id: str, *, base: Any = None, experts: Sequence[Any] = (),
               base_dir: Path | str | None = None, dtype: str | None = None,
               command: str | None = None) -> str:
    """The model card of ``model_id`` of the run in ``run_dir``, as markdown text.

    Args:
        run_dir: the run directory (``state.json``, ``metrics.jsonl``, ``config.yaml``).
        model_id: ``g000123``, ``expert:<skill>``, ``base`` or ``aggregate``.
        base, experts: the base and expert specs (path or hub id) the run merged.
        base_dir: the base's HF folder (its README.md's ``license``, if any, is copied).
        dtype: the exported weights' dtype name (``None``: as stored).
        command: the command line that exported it.
    Raises:
        FileNotFoundError: no state.json; RunDirError: a corrupt state.json / metrics.jsonl.
    """
    rd = RunDir(run_dir)
    state = rd.load_state()
    cfg_text = rd.config.read_text()
    cfg = yaml.safe_load(cfg_text)
    skills = [str(s["name"]) for s in cfg["skills"]]
    records = rd.read_metrics()
    by_id: dict[str, dict] = {}
    for r in records:
        by_id[str(r.get("child") if r.get("kind") != "aggregate" else "aggregate")] = r
    ops = cfg.get("operators", {})

    def op_text(key: str) -> str:
        o = dict(ops.get(key) or {})
        name = o.pop("name", "?")
        return f"`{name}`" + (f" ({', '.join(f'{k}={v}' for k, v in o.items())})" if o else "")

    # --- front matter
    hub = [h for h in (_hub_id(base), *(_hub_id(e) for e in experts)) if h]
    meta: dict[str, Any] = {}
    if hub:
        meta["base_model"] = hub if len(hub) > 1 else hub[0]
    meta["tags"] = list(TAGS)
    meta["library_name"] = "transformers"
    lic = _base_license(Path(base_dir) if base_dir else None, base)
    if lic:
        meta["license"] = lic
    out = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", ""]

    # --- what it is
    name = cfg.get("name", "run")
    out.append(f"# {model_id} of the CycleQD run `{name}`\n")
    places = []
    for a in state["archives"]:
        for e in a["elites"]:
            if e["id"] == model_id:
                places.append(f"archive `{a['quality_skill']}` cell ({', '.join(map(str, e['cell']))})")
    rec = by_id.get(model_id)
    final = load_final(rd.root) if model_id == "aggregate" else None
    if model_id == "aggregate":
        srcs = (rec or {}).get("sources") or []
        how = (f"built by the final-model strategy `{final.get('chosen')}`"
               + (f" (chosen by `{final['strategy']}`, see below)" if final.get("strategy") != final.get("chosen")
                  else "") if final else f"merged by model aggregation {op_text('aggregation')}")
        what = (f"The aggregated model: from the best elite of each archive ({', '.join(f'`{s}`' for s in srcs)}), "
                f"{how} (paper §3.4).")
    elif model_id == "base":
        what = "The run's base model (no task vector)."
    elif model_id.startswith("expert:"):
        what = f"A seed model of the run: the `{model_id.split(':', 1)[1]}` expert, unchanged."
    else:
        what = (f"A model bred by CycleQD in generation {rec['generation']}" if rec else
                f"A model bred by CycleQD (no metrics line recorded for `{model_id}`)") + "."
    if model_id != "aggregate":
        what += (f" An elite in {'; '.join(places)} of the run's last state (generation "
                 f"{state['generation']})." if places else
                 f" Not an elite of the run's last state (generation {state['generation']}).")
    out.append(what)
    out.append(f"\nThe run merges the base `{base}` with the experts "
               + ", ".join(f"`{s}`: `{e}`" for s, e in zip(skills, experts)) + "." if base else "")

    # --- scores
    out.append("\n## Scores\n")
    if rec is not None:
        rows = [["search"] + _scores_row(rec.get("scores"), skills)]
        test = _test_scores(rd.root, model_id)
        if test:
            rows.append(["test (held out)"] + _scores_row(test, skills))
        out.append(_table(["split"] + skills + ["mean"], rows))
        out.append("\nSearch split: the items CycleQD selected on (each skill's score is its quality "
                   "in [0, 1]; one archive's quality is the other archives' behaviour characteristic)."
                   + ("" if test else " No held-out test scores are recorded in the run directory."))
    else:
        out.append(f"No metrics line of `{model_id}` is recorded in `metrics.jsonl`.")
    if final is not None:
        out += _final_section(final, skills)

    # --- lineage
    out.append("\n## Lineage\n")
    out.append(f"Each child: crossover {op_text('crossover')} of two parents sampled from the archive "
               f"of the skill in turn, then mutation {op_text('mutation')} (genome `{ops.get('genome', '?')}`). "
               "Ancestors as recorded in `metrics.jsonl` (search-split scores):\n")
    order: list[str] = []
    todo = list((rec or {}).get("sources") or []) if model_id == "aggregate" else [model_id]
    seen = set(todo)
    while todo:
        mid = todo.pop(0)
        order.append(mid)
        for p in (by_id.get(mid) or {}).get("parents") or []:
            if p not in seen:
                seen.add(p)
                todo.append(p)
    rows = []
    for mid in order[:LINEAGE_ROWS]:
        r = by_id.get(mid)
        if r is None:
            rows.append([f"`{mid}`", "-", "-", "(not recorded)"] + ["-"] * (len(skills) + 1))
            continue
        kind = "seed" if r["generation"] == 0 else _fmt(r.get("quality_skill"))
        rows.append([f"`{mid}`", str(r["generation"]), kind,
                     ", ".join(f"`{p}`" for p in r.get("parents") or []) or "-"]
                    + _scores_row(r.get("scores"), skills))
    out.append(_table(["model", "generation", "bred for archive", "parents"] + skills + ["mean"], rows))
    if len(order) > LINEAGE_ROWS:
        out.append(f"\n{len(order) - LINEAGE_ROWS} more ancestors are recorded in the run's `metrics.jsonl`.")

    # --- config, method, provenance
    out.append("\n## Run configuration\n")
    out.append(f"Config fingerprint `{state.get('config_fingerprint', '?')}`, seed {cfg.get('seed')}, "
               f"{state['generation']} of {cfg.get('qd', {}).get('generations', '?')} generations done.\n")
    out.append("```yaml\n" + cfg_text.rstrip() + "\n```")
    out.append("\n## Method\n")
    out.append("CycleQD: Kuroki, S., Nakamura, T., Akiba, T., Tang, Y. \"Agent Skill Acquisition for "
               "Large Language Models via CycleQD\", ICLR 2025, [arXiv:2410.14735]"
               "(https://arxiv.org/abs/2410.14735); official code "
               "[SakanaAI/CycleQD](https://github.com/SakanaAI/CycleQD). Each skill in turn is the "
               "quality of its own MAP-Elites archive while the other skills are its behaviour "
               "characteristics; children are model merges of elites (task-vector crossover) "
               "with SVD-based mutation.")
    out.append("\n## How it was produced\n")
    out.append(f"Exported with cycleqd {cycleqd.__version__}"
               + (f" in {dtype}" if dtype else "")
               + (f":\n\n```sh\n{command}\n```" if command else "."))
    out.append("\nThe weights are the base's plus the model's task vector, saved with the base's "
               "tensor names, config and tokenizer: load with "
               "`transformers.AutoModelForCausalLM.from_pretrained`. `cycleqd_export.json` "
               "records the run directory and the model id.")
    return "\n".join(out) + "\n"
