"""DB-Bench gold answers through the real grader (not a test; prints measured counts).

The reference agent of every item of ``dbbench/standard.jsonl`` plays the episode
through :class:`cycleqd.skills.agentbench.dbbench.DBBenchSkill` exactly as a model would -- INSERT/
UPDATE items: one ``Action: Operation`` per gold statement (``label``), then an answer;
SELECT-type items: ``Final Answer:`` with the gold ``label`` (the gold answer is ``label``,
not the dataset's ``sql``, which reproduces it on only 38/100 items) -- and the grader
scores it. Printed per backend and scorer: modification items passed / 200, SELECT items
passed / 100, and every failure with the grader's reason.

    source .ci/mariadb.sh                           # only for --backend mariadb|both
    PYTHONPATH=$PWD python benchmarks/db_gold.py                     # sqlite, strict
    PYTHONPATH=$PWD python benchmarks/db_gold.py --backend both --scorer all
    # the official protocol (341 official rows, official messages, agentbench-v0.2 forced):
    PYTHONPATH=$PWD python benchmarks/db_gold.py --protocol official [--backend both]

Measured 2026-12-02 on this 2-core machine (see docs/graders.md, § DB-Bench):
strict and agentbench, SQLite and MariaDB 10.11 alike: modification 199/200 (dbbench/225:
its gold UPDATE does not reproduce answer_md5 -- no single-cell edit of its table does, a
data error), SELECT 100/100.
``--protocol official`` (341 official rows, agentbench-v0.2), SQLite and MariaDB alike:
modification 222/223 (dbbench/225 again), SELECT 113/118: rows 13, 14, 17, 77 of the
official file are an older ``standard.jsonl`` with table errors fixed upstream since
(duplicate column ``Score``; rows shorter than the header), and dev row 305 has an empty
column name -- unbuildable tables, failed samples under any scorer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cycleqd.skills.agentbench.dbbench import DB_PROMPT, DBBenchSkill  # noqa: E402


def gold_model(items):
    """A generation backend stand-in that plays each item's reference solution."""
    by_q = {it.description + "\n" + it.add_description: it for it in items}

    class Gold:
        fingerprint = None  # never cached

        def generate(self, conversations, *, max_new_tokens, stop=()):
            out = []
            for conv in conversations:
                assert conv[0]["content"] == DB_PROMPT
                it = by_q[conv[2]["content"]]
                done = sum(1 for m in conv[3:] if m["role"] == "assistant")
                stmts = [s for s in it.label if isinstance(s, str) and s.strip()]
                if it.is_modification and done < len(stmts):
                    out.append(f"I will change the table.\nAction: Operation\n```sql\n"
                               f"{stmts[done]}\n```")
                elif it.is_modification:
                    out.append('Action: Answer\nFinal Answer: ["done"]')
                else:
                    out.append("Action: Answer\nFinal Answer: " + json.dumps(list(it.label)))
            return out

    return Gold()


def run(backend: str, scorer: str, data_path: str | None, protocol: str = "project") -> dict:
    if protocol == "official":
        sk = DBBenchSkill(data_path, backend=backend, cache=None, episode_batch=50,
                          protocol="official")
    else:
        sk = DBBenchSkill(data_path, split="all", backend=backend, scorer=scorer, cache=None,
                          episode_batch=50)
    t0 = time.monotonic()
    r = sk.evaluate(gold_model(sk.items))
    secs = time.monotonic() - t0
    mod = [it for it in sk.items if it.is_modification]
    sel = [it for it in sk.items if not it.is_modification]
    fails = {it.id: (it.type, sk.last_details[it.id].get("verdict")
                     or sk.last_details[it.id].get("error"))
             for it in sk.items if r.outcomes[it.id] != 1.0}
    return {"backend": backend, "scorer": scorer,
            "modification": f"{sum(r.outcomes[i.id] == 1.0 for i in mod)}/{len(mod)}",
            "select": f"{sum(r.outcomes[i.id] == 1.0 for i in sel)}/{len(sel)}",
            "seconds": round(secs, 1), "failures": fails}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=("sqlite", "mariadb", "both"), default="sqlite")
    ap.add_argument("--scorer", choices=("strict", "agentbench", "agentbench-v0.2", "all"),
                    default="strict")
    ap.add_argument("--data", default=None, help="DB-Bench file or data folder")
    ap.add_argument("--protocol", choices=("project", "official"), default="project",
                    help="official: the 341 official rows, scorer agentbench-v0.2 (--scorer ignored)")
    a = ap.parse_args(argv)
    if a.protocol == "official":
        a.scorer = "agentbench-v0.2"
    backends = ("sqlite", "mariadb") if a.backend == "both" else (a.backend,)
    scorers = ("strict", "agentbench", "agentbench-v0.2") if a.scorer == "all" else (a.scorer,)
    for b in backends:
        for s in scorers:
            res = run(b, s, a.data, a.protocol)
            print(f"{b:8s} {s:15s} modification {res['modification']:>7s}  "
                  f"select {res['select']:>7s}  ({res['seconds']} s)")
            for iid, (typ, why) in res["failures"].items():
                print(f"    FAIL {iid} ({typ}): {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
