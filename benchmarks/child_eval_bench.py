"""One demo child's evaluation: main's path vs one batch per child, side by side in one run.

Not a test: it prints figures measured in one process, the paths called alternately.

Setup (``configs/demo.yaml`` unless ``--config``): SmolLM2-135M-Instruct, the demo's three
LoRA experts (coding / db / os, trained by ``cycleqd demo`` into ``<cache>/experts``; the
newest folder per skill, or ``--expert NAME=PATH``), the demo's operators (linear crossover,
SVD mutation, compact SVD genomes), the demo's backend (HF, CPU, fp32, batch 32) and the
demo's skills on their *search* splits (``search_limit`` items each), with the sample cache
OFF so every item is generated and judged each time. One child = crossover + mutation of the
coding and db experts (``make_child`` of generation 1, seed ``--seed``).

Paths timed (wall seconds, and this process's CPU seconds):

* ``main``: what ``main`` runs: materialise the child, finite check, fingerprint, load the
  weights, then the skills one after another (each agent turn one ``generate`` call) on the
  ``transformers`` forward -- ``score_child`` with ``WorkerContext.pooled=False``,
  ``backend.lowrank: off`` and ``HFBackend.fast = False`` (main's decode loop);
* ``new``: the engine's defaults (lean Llama decoder of ``cycleqd.inference.fastllama``
  included): the same bind (``lowrank: auto`` materialises a child
  whose evaluation is long, as this one), then all skills concurrently through one
  :class:`~cycleqd.inference.pool.GenerationPool` (coding prompts and every agent turn in
  one continuous batch; an episode's next turn joins as soon as its observation is back);
* ``pooled``: the pool on main's decoder (the ``transformers`` forward) and main's prefix
  rule (``HFBackend.prefix_cache="call"``: one shared prefix per call / prefill group);
* ``pooled+apc``: ``pooled`` with the engine's prefix rule (``prefix_cache="prompts"``:
  prefix-aware admission -- each skill's prompts over their own system-prompt KV -- and the
  prompt KV memo, so an agent's next turn is prefilled only past its previous turn);
* ``new-call``: ``new`` with main's prefix rule (what ``new`` was before the prompt memo);
* ``--factored``: also ``new`` with ``lowrank: on`` (the child never materialised).

``--paths`` picks the paths (default ``main,new-call,new``; ``main`` is always run, first).

Printed: per path the bind and evaluation times, the ratio main / new, and whether every
skill's score, per-item outcomes and replies (coding replies, agent transcripts) are
identical to main's, and the prefill figures (prompt tokens computed, tokens served from a
shared or memoised prefix). The HF backend's prefix and prompt KV memos are cleared before
each path so no path reuses another's prefill.

Run:  nice python benchmarks/child_eval_bench.py [--reps 1] [--threads 1] [--limit 8]
      [--paths main,pooled,pooled+apc,new-call,new] [--factored]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._machine import describe, load as load_avg  # noqa: E402


def _newest_expert(cache: Path, name: str) -> Path | None:
    cands = [p for p in (cache / "experts").glob(f"{name}-*")
             if (p / "adapter_model.safetensors").is_file() and (p / "train_report.json").is_file()]
    return max(cands, key=lambda p: p.stat().st_mtime) if cands else None


def _load(args):
    from cycleqd import paths
    from cycleqd.demo.config import load_demo_config
    from cycleqd.demo.llm import DEFAULT_CONFIG, resolve_base_dir, run_config
    from cycleqd.engine.build import build_llm_skill
    from cycleqd.engine.runview import weight_space
    from cycleqd.inference.adapter import LLMAdapter

    ov = {"skills.*.search_limit": args.limit} if args.limit else {}
    cfg = load_demo_config(Path(args.config) if args.config else DEFAULT_CONFIG, ov)
    cache = paths.cache_dir(cfg)
    base_dir = resolve_base_dir(cfg, cache)
    given = dict(kv.split("=", 1) for kv in args.expert)
    experts = {}
    for s in cfg.skills:
        p = given.get(s.name) or _newest_expert(cache, s.name)
        if p is None:
            sys.exit(f"no trained {s.name!r} expert in {cache / 'experts'} (run `cycleqd demo` "
                     f"first, or pass --expert {s.name}=PATH)")
        experts[s.name] = str(p)
    rc = run_config(cfg, base_dir, experts, cache)
    skills = []
    for sc in rc.skills:   # sample cache off: every item generated and judged each time
        skills.append(build_llm_skill(sc.model_copy(update={"params": {**sc.params, "cache": None}}), cache))
    space, info = weight_space(rc, cache)
    adapter = LLMAdapter.from_config(rc.backend, info)
    return cfg, rc, experts, skills, space, adapter


def _trie_size(prompts) -> int:
    """Distinct token prefixes of ``prompts`` (nodes of their token trie): the fewest prompt
    tokens a prefill can compute when it reuses the KV of every exactly shared prefix (the
    floor of any prefix cache working on prompts alone)."""
    root: dict = {}
    n = 0
    for p in prompts:
        node = root
        for t in p:
            nxt = node.get(t)
            if nxt is None:
                nxt = node[t] = {}
                n += 1
            node = nxt
    return n


def _record_prompts(seen: list) -> None:
    """Append every prompt that HFBackend's decode loop receives to ``seen``."""
    from cycleqd.inference.hf import HFBackend
    orig = HFBackend._decode_loop

    def loop(self, poll, prefix):
        def rec(block):
            out = poll(block)
            if out:
                seen.extend(r.prompt_ids for r in out)
            return out
        return orig(self, rec, prefix)

    HFBackend._decode_loop = loop


def _details(skills):
    return {s.name: dict(getattr(s, "last_details", {}) or {}) for s in skills}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="demo config (default configs/demo.yaml)")
    ap.add_argument("--expert", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--reps", type=int, default=2,
                    help="rounds of (main, new[, factored]); odd rounds in reverse order")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, help="search items per skill (default: the config's)")
    ap.add_argument("--factored", action="store_true", help="also time new + lowrank: on")
    ap.add_argument("--paths", default="main,new-call,new",
                    help="comma-separated paths (main always runs): main, pooled, pooled+apc, "
                         "new-call, new")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from cycleqd.engine.step import Job, WorkerContext, make_child, score_child
    from cycleqd.qd.scheduler import derive_seed  # noqa: F401  (seeds as in the loop)

    t = time.perf_counter()
    cfg, rc, experts, skills, space, adapter = _load(args)
    print(f"setup {time.perf_counter() - t:.1f} s: base {rc.model.base}, experts {experts}")
    print(f"skills: {[(s.name, len(getattr(s, 'items', getattr(s, 'problems', [])))) for s in skills]}, "
          f"backend {rc.backend.type}/{rc.backend.device}/{rc.backend.dtype} batch {rc.backend.batch_size}, "
          f"torch threads {torch.get_num_threads()}")

    class Store:
        def __init__(self, g):
            self.g = g

        def get(self, k):
            return self.g[k]

    names = [s.name for s in rc.skills]
    store = Store({f"expert:{n}": g for n, g in zip(names, space.expert_genomes())})
    job = Job(1, 0, (f"expert:{names[0]}", f"expert:{names[1]}"), "bench-child", args.seed)
    child = make_child(WorkerContext(space, store, adapter, skills, "bench"), job, {})
    backend = adapter.backend

    # (name, pooled, lowrank, lean decoder, prefix rule): main = sequential skills,
    # materialised child, the transformers forward and one shared prefix per call (main's
    # decode loop); new = the engine's defaults
    lr = rc.backend.lowrank
    table = {"main": (False, "off", False, "call"), "pooled": (True, lr, False, "call"),
             "pooled+apc": (True, lr, False, "prompts"), "new-call": (True, lr, True, "call"),
             "new": (True, lr, True, "prompts")}
    chosen = ["main"] + [p for p in args.paths.split(",") if p and p != "main"]
    unknown = [p for p in chosen if p not in table]
    if unknown:
        sys.exit(f"unknown --paths {unknown}; choose from {sorted(table)}")
    paths_ = [(p, *table[p]) for p in chosen]
    if args.factored:
        paths_.append(("new+factored", True, "on", True, "prompts"))
    runs: dict[str, list[dict]] = {p[0]: [] for p in paths_}
    seen: list[list[int]] = []
    _record_prompts(seen)
    for rep in range(args.reps):
        # odd rounds run the paths in reverse order: a warm-up or load change hits both sides
        for name, pooled, lowrank, fast, rule in (paths_ if rep % 2 == 0 else paths_[::-1]):
            adapter.lowrank = lowrank
            if hasattr(backend, "fast"):
                backend.fast = fast
            if hasattr(backend, "prefix_cache"):
                backend.prefix_cache = rule
            adapter.last_bind_s = adapter.last_eval_s = None   # auto: no measurements carried over
            for attr in ("_prefix_memo", "_prompt_memo"):
                memo = getattr(backend, attr, None)
                if memo is not None:
                    memo.clear()
            if hasattr(backend, "reset_stats"):
                backend.reset_stats()
            ctx = WorkerContext(space, store, adapter, skills, "bench", pooled=pooled)
            seen.clear()
            timings: dict[str, float] = {}
            load = os.getloadavg()[0]
            c0, w0 = time.process_time(), time.perf_counter()
            res = score_child(ctx, job, child, timings)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            assert res.rejected is None, res.rejected
            st = dict(getattr(backend, "stats", {}) or {})
            rec = {"wall": wall, "cpu": cpu, "load": load, "timings": timings, "stats": st,
                   "scores": {k: (r.quality, r.outcomes) for k, r in res.results.items()},
                   "details": _details(skills), "fp": res.fingerprint}
            runs[name].append(rec)
            bind = sum(timings.get(k, 0.0) for k in ("materialize_s", "finite_check_s", "fingerprint_s",
                                                     "bind_s", "bind_factored_s"))
            per = " ".join(f"{s.name} {timings[f'eval_{s.name}_s']:.1f}" for s in skills)
            print(f"rep {rep} {name:13s} wall {wall:7.1f} s  cpu {cpu:7.1f} s  bind {bind:5.1f} s  "
                  f"eval {timings['eval_s']:7.1f} s  ({per})  load1 {load:.1f}  "
                  f"scores {{{', '.join(f'{k}: {v[0]:.2f}' for k, v in rec['scores'].items())}}}")
            if st:   # decode forwards: on a GPU a step costs about the same for 20 or 60 rows
                print(f"      decoder: {st.get('steps')} decode steps, {st.get('row_steps')} row-steps "
                      f"(mean batch {st.get('row_steps', 0) / max(1, st.get('steps', 0)):.1f}), "
                      f"{st.get('prefill_rows')} prompts prefilled, {st.get('tokens')} tokens; "
                      f"prefill {st.get('prefill_s', 0):.1f} s, decode {st.get('decode_s', 0):.1f} s, "
                      f"host {st.get('host_s', 0):.1f} s; lean decoder fallback: "
                      f"{getattr(backend, 'fast_fallback', None)}")
                print(f"      prefill: {st.get('prefill_tokens')} prompt tokens computed "
                      f"({st.get('prefill_padded', '?')} rows' own parts with padding), "
                      f"{st.get('prefill_reused', 0)} served by a shared/memoised prefix "
                      f"({st.get('prefill_memo', 0)} from a memo); prefix rule {rule}; "
                      f"prompt memo {len(getattr(backend, '_prompt_memo', ()) or ())} entries, "
                      f"{getattr(getattr(backend, '_prompt_memo', None), 'bytes', 0) / 2**20:.0f} MiB")
                print(f"      prompts: {len(seen)}, {sum(map(len, seen))} tokens, of which "
                      f"{_trie_size(seen)} distinct prefixes (the floor with exact prefix reuse)")
            sys.stdout.flush()
    ref = runs["main"][0]
    print()
    for name, recs in runs.items():
        same_scores = all(r["scores"] == ref["scores"] for r in recs)
        same_replies = all(r["details"] == ref["details"] for r in recs)
        n_items = sum(len(d) for d in ref["details"].values())
        w = statistics.median(r["wall"] for r in recs)
        c = statistics.median(r["cpu"] for r in recs)
        ratio = statistics.median(runs["main"][i]["wall"] / r["wall"] for i, r in enumerate(recs))
        steps = statistics.median(r["stats"].get("steps", 0) for r in recs)
        sratio = statistics.median(runs["main"][i]["stats"].get("steps", 0) / max(1, r["stats"].get("steps", 0))
                                   for i, r in enumerate(recs))
        cratio = statistics.median(runs["main"][i]["cpu"] / r["cpu"] for i, r in enumerate(recs))
        pt = statistics.median(r["stats"].get("prefill_tokens", 0) for r in recs)
        ps = statistics.median(r["stats"].get("prefill_s", 0) for r in recs)
        print(f"{name:13s} median wall {w:7.1f} s  cpu {c:7.1f} s  main/this wall ratio {ratio:5.2f}x  "
              f"cpu ratio {cratio:5.2f}x  prefill {pt:.0f} tokens {ps:.1f} s  "
              f"decode steps {steps:.0f} (main/this {sratio:.2f}x)  "
              f"scores identical to main: {same_scores}  replies identical ({n_items} items): {same_replies}")
        if not same_replies:
            for sk, d in ref["details"].items():
                diff = [k for k in d if recs[0]["details"][sk].get(k) != d[k]]
                if diff:
                    print(f"    {sk}: {len(diff)} items differ, e.g. {diff[0]}: main "
                          f"{str(d[diff[0]])[:300]!r} vs {str(recs[0]['details'][sk][diff[0]])[:300]!r}")
    print(f"\nCPU: {describe()}; now {load_avg()}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    adapter.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
