"""Run export: model card, --overwrite, --dtype, file modes, --push-to-hub (local Hub stand-in)."""

from __future__ import annotations

import base64
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cycleqd import _io
from cycleqd.cli import main
from cycleqd.engine.export import check_hub_target, export_from_run, push_to_hub, write_hf_folder
from cycleqd.engine.model_card import model_card
from cycleqd.engine.rundir import RunDir


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_synthetic_run):
    run_dir, comp = tiny_synthetic_run(tmp_path_factory.mktemp("exportrun"), generations=6, snapshot_every=3)
    return {"dir": run_dir, "space": comp.space}


def _bred_elite(run_dir: Path) -> str:
    st = json.loads((run_dir / "state.json").read_text())
    return max(e["id"] for a in st["archives"] for e in a["elites"] if e["id"].startswith("g"))


def _records(run_dir: Path) -> dict[str, dict]:
    return {("aggregate" if r.get("kind") == "aggregate" else r["child"]): r
            for r in RunDir(run_dir).read_metrics()}


def test_card_scores_lineage_config(tmp_path, run):
    rd = run["dir"]
    mid = _bred_elite(rd)
    out = export_from_run(rd, tmp_path / "m", model_id=mid, command="cycleqd export RUN --model X OUT")
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["tags"] == ["cycleqd", "merge", "model-merging", "quality-diversity"]
    assert meta["library_name"] == "transformers" and "base_model" not in meta  # local paths only
    recs = _records(rd)
    sc = recs[mid]["scores"]
    mean = (sc["a"] + sc["b"]) / 2
    assert f"| search | {sc['a']:.4f} | {sc['b']:.4f} | {mean:.4f} |" in card
    todo, seen = [mid], set()                        # every recorded ancestor, with its parents
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        r = recs[m]
        parents = ", ".join(f"`{p}`" for p in r["parents"]) or "-"
        kind = "seed" if r["generation"] == 0 else r["quality_skill"]
        assert f"| `{m}` | {r['generation']} | {kind} | {parents} |" in card
        todo += r["parents"]
    assert {"expert:a", "expert:b"} <= seen and len(seen) >= 3
    state = json.loads((rd / "state.json").read_text())
    assert f"Config fingerprint `{state['config_fingerprint']}`" in card
    assert "```yaml\n" + (rd / "config.yaml").read_text().rstrip() + "\n```" in card
    assert "arXiv:2410.14735" in card and "SakanaAI/CycleQD" in card
    assert "cycleqd export RUN --model X OUT" in card

    agg = export_from_run(rd, tmp_path / "agg", aggregate=True)
    text = (agg / "README.md").read_text()
    r = recs["aggregate"]
    assert all(f"`{s}`" in text.split("## Scores")[0] for s in r["sources"])
    assert f"| search | {r['scores']['a']:.4f} | {r['scores']['b']:.4f} |" in text


def test_card_hub_metadata_license_and_demo_test_scores(tmp_path, run):
    rd = tmp_path / "demo" / "cycleqd"                 # the demo's layout: comparison.json beside
    rd.mkdir(parents=True)
    for f in ("state.json", "metrics.jsonl", "config.yaml"):
        (rd / f).write_bytes((run["dir"] / f).read_bytes())
    (rd.parent / "comparison.json").write_text(json.dumps(
        {"rows": [{"id": "cycleqd:aggregate", "scores": {"a": 0.25, "b": 0.75}}]}))
    base = tmp_path / "basecard"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    card = model_card(rd, "aggregate", base="org-x/base-model", experts=["org-x/exp-a", str(base)],
                      base_dir=base)
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == ["org-x/base-model", "org-x/exp-a"] and meta["license"] == "apache-2.0"
    assert "| test (held out) | 0.2500 | 0.7500 | 0.5000 |" in card
    assert "test (held out)" not in model_card(rd, "expert:a")   # no test row recorded for it


def test_overwrite_refusal_swap_and_safety(tmp_path, run, monkeypatch, capsys):
    rd = run["dir"]
    out = export_from_run(rd, tmp_path / "o", model_id="expert:a")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_from_run(rd, out, model_id="expert:b")
    assert main(["export", str(rd), "--model", "expert:b", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not empty" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    def boom():                                        # a failure half-way: OUT untouched
        yield "w", torch.ones(2)
        raise RuntimeError("disk gone")
    with pytest.raises(RuntimeError):
        write_hf_folder(boom(), out, None, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    for exchange in (True, False):                     # renameat2 swap, and the rename fallback
        if not exchange:
            monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
        mid = "expert:b" if exchange else "base"
        assert main(["export", str(rd), "--model", mid, str(out), "--overwrite"]) == 0
        assert json.loads((out / "cycleqd_export.json").read_text())["model_id"] == mid
        assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]   # no temp/old siblings

    other = tmp_path / "notes"
    other.mkdir()
    (other / "x.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a model folder"):
        export_from_run(rd, other, model_id="base", overwrite=True)
    with pytest.raises(FileExistsError, match="run directory"):
        export_from_run(rd, rd.parent, model_id="base", overwrite=True)
    base_dir = Path(json.loads((out / "cycleqd_export.json").read_text())["base"])
    with pytest.raises(FileExistsError, match="the run reads"):
        export_from_run(rd, base_dir, model_id="expert:a", overwrite=True)
    assert (other / "x.txt").read_text() == "keep" and (rd / "state.json").is_file()


def test_dtype_round_trip_and_float16_range(tmp_path, run):
    from transformers import AutoModelForCausalLM

    rd, space = run["dir"], run["space"]
    mid = _bred_elite(rd)
    want = space.materialize(space.load(rd / "genomes" / f"{mid}{space.genome_suffix}"))
    for name, dt in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("auto", torch.float32)):
        out = export_from_run(rd, tmp_path / name, model_id=mid, dtype=name)
        got = load_file(out / "model.safetensors")
        assert all(got[k].dtype == dt and torch.equal(got[k], want[k].to(dt)) for k in want)
        assert json.loads((out / "config.json").read_text())["dtype"] == str(dt).removeprefix("torch.")
        m = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
        assert next(m.parameters()).dtype == dt
        assert f"in {str(dt).removeprefix('torch.')}" in (out / "README.md").read_text()
    big = [("a.weight", torch.ones(3)), ("b.weight", torch.tensor([1.0, 7e4, 2.0]))]
    with pytest.raises(ValueError, match="'b.weight' does not fit float16") as e:
        write_hf_folder(iter(big), tmp_path / "f16", None, dtype="float16")
    assert "\n" not in str(e.value) and not (tmp_path / "f16").exists()
    assert load_file(write_hf_folder(iter(big), tmp_path / "bf", None, dtype="bfloat16")
                     / "model.safetensors")["b.weight"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'int8'"):
        export_from_run(rd, tmp_path / "x", model_id=mid, dtype="int8")


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_file_modes_follow_umask(tmp_path, run, mask):
    old = os.umask(mask)
    try:
        out = export_from_run(run["dir"], tmp_path / "p", model_id="expert:a")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    files = list(out.iterdir())
    assert "model.safetensors" in {p.name for p in files}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~mask)}


class _Hub(BaseHTTPRequestHandler):
    """The Hub endpoints ``create_repo`` + ``upload_folder`` use (create, README metadata
    check, preupload, commit); every file is declared ``regular`` (inline, base64 in the
    commit's NDJSON), one of the Hub's answers."""

    def _send(self, obj):
        b = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = f"http://127.0.0.1:{self.server.server_port}"
        self.server.calls.append((self.path, body, self.headers.get("authorization")))
        if self.server.refuse and "/commit/" in self.path:
            b = json.dumps({"error": "You don't have the rights to create a model under this namespace"}).encode()
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Error-Message", "You don't have the rights to create a model under this namespace")
            self.send_header("Content-Length", str(len(b)))
            self.end_headers()
            return self.wfile.write(b)
        if self.path == "/api/repos/create":
            return self._send({"url": f"{url}/{self.server.repo}"})
        if self.path == "/api/validate-yaml":
            meta = yaml.safe_load(json.loads(body)["content"].split("---")[1])
            return self._send({"errors": [], "warnings": []} if isinstance(meta, dict) else
                              {"errors": [{"message": "no metadata"}]})
        if "/preupload/" in self.path:
            return self._send({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in json.loads(body)["files"]]})
        if "/commit/" in self.path:
            return self._send({"commitUrl": f"{url}/{self.server.repo}/commit/{'c' * 40}", "commitOid": "c" * 40})
        self.send_error(404)

    def log_message(self, *a):
        pass


@pytest.fixture
def hub():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    srv.calls, srv.repo, srv.refuse = [], "someone/cqd-model", False
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _uploaded(calls) -> dict[str, bytes]:
    body = next(b for p, b, _ in calls if "/commit/" in p)
    lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
    return {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}


def test_push_to_hub_uploads_the_exported_folder(tmp_path, run, hub, monkeypatch, capsys):
    out = export_from_run(run["dir"], tmp_path / "h", aggregate=True)
    url = push_to_hub(out, hub.repo, private=True, token="hf_test", endpoint=f"http://127.0.0.1:{hub.server_port}")
    assert url.endswith("/commit/" + "c" * 40)
    assert json.loads(hub.calls[1][1])["content"] == (out / "README.md").read_text()
    create = json.loads(hub.calls[0][1])
    assert hub.calls[0][0] == "/api/repos/create" and create["visibility"] == "private"
    assert create["organization"] == "someone" and create["name"] == "cqd-model"
    assert all(auth == "Bearer hf_test" for _, _, auth in hub.calls)
    assert _uploaded(hub.calls) == {p.name: p.read_bytes() for p in out.iterdir()}

    hub.calls.clear()                                   # the command line: HF_ENDPOINT / HF_TOKEN
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.server_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert main(["export", str(run["dir"]), "--model", "expert:b", str(tmp_path / "c"),
                 "--push-to-hub", hub.repo]) == 0
    assert "visibility" not in json.loads(hub.calls[0][1])     # the namespace's default
    assert all(auth == "Bearer hf_env" for _, _, auth in hub.calls)
    assert _uploaded(hub.calls) == {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    hub.refuse = True                                   # a refusal: one line, the export kept
    assert main(["export", str(run["dir"]), "--model", "base", str(tmp_path / "r"),
                 "--push-to-hub", hub.repo]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and hub.repo in err and "rights" in err and str(tmp_path / "r") in err
    assert (tmp_path / "r" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="NAMESPACE/NAME|push-to-hub"):
        check_hub_target("just-a-name", token="x")
    with pytest.raises(ValueError, match="push-to-hub"):
        check_hub_target("bad id!/x y", token="x")


def test_card_of_an_auto_final_model_reads_final_json(tmp_path):
    from cycleqd.config import AUTO_STRATEGIES, parse_config
    from cycleqd.engine.build import build_components
    from cycleqd.engine.loop import run_cycleqd

    cfg = parse_config({
        "name": "f", "seed": 1, "cache_dir": str(tmp_path / "cache"),
        "skills": [{"name": n, "type": "synthetic", "bc_range": [0.0, 1.0], "bins": 4} for n in ("a", "b")],
        "model": {"synthetic": {"arch": "llama", "seed": 0, "hidden_size": 32, "num_layers": 1,
                                "expert_rank": 2, "expert_scale": 0.05}},
        "operators": {"crossover": {"name": "linear", "sigma": 0.01},
                      "mutation": {"name": "svd_expert", "rate": 0.1}, "genome": "auto"},
        "qd": {"generations": 4, "snapshot_every": 2},
        "final": {"strategy": "auto", "params": {"weight_search": {"budget": 2}}}})
    run_cycleqd(build_components(cfg), cfg, tmp_path / "run", progress=False)
    rec = json.loads((tmp_path / "run" / "final.json").read_text())
    card = model_card(tmp_path / "run", "aggregate")
    section = card.split("## How the final model was chosen")[1].split("## Lineage")[0]
    assert f"built by the final-model strategy `{rec['chosen']}` (chosen by `auto`" in card
    assert f"chosen: `{rec['chosen']}` (rule: {rec['rule']})" in section
    assert f"{len(AUTO_STRATEGIES)} candidates" in section and "validation split" in section
    for c in rec["candidates"]:                           # every candidate, its recorded numbers
        row = (f"| `{c['strategy']}` | " + (", ".join(f"{k}={v}" for k, v in c["params"].items()) or "-")
               + f" | {c['validation']['a']:.4f} | {c['validation']['b']:.4f} | {c['validation_mean']:.4f} | ")
        assert row + ("**chosen** |" if c["strategy"] == rec["chosen"] else " |") in section
    ws = rec["candidates"][list(AUTO_STRATEGIES).index("weight_search")]["search"]
    assert "`weight_search` chose weights=" in section and f"among {len(ws['candidates'])} candidates" in section
    assert "## How the final model was chosen" not in model_card(tmp_path / "run", "expert:a")
    (tmp_path / "run" / "final.json").unlink()             # an older run: no record, nothing invented
    old = model_card(tmp_path / "run", "aggregate")
    assert "How the final model was chosen" not in old and "merged by model aggregation `paper`" in old
