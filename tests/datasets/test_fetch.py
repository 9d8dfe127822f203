"""The benchmark-data catalogue and fetch code, against an HTTP server on 127.0.0.1 serving
copies of this workplace's data (never the network)."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest

from cycleqd import datasets
from cycleqd.cli import main as cli_main
from cycleqd.datasets import (CATALOGUE, DEFAULT_DATASETS, ChecksumError, DataError, DataMissingError,
                              file_status, mbpp_sanitized_to_jsonl)
from cycleqd.paths import data_dir

from tests.conftest import tiny_config_dict

SHARED = data_dir()   # tests/conftest.py: ../shared/data when present
FILES = [f for d in CATALOGUE.values() for f in d.files]
HAVE_ALL = all((SHARED / f.rel).is_file() for f in FILES)
needs_shared = pytest.mark.skipif(not HAVE_ALL, reason=f"no copy of every catalogue file in {SHARED}")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()


@pytest.fixture
def serve(tmp_path):
    """serve(folder) -> base URL of a server on 127.0.0.1 for that folder (stopped at the end)."""
    servers = []

    def start(folder: Path) -> str:
        handler = type("H", (_Quiet,), {"requests": []})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append((srv, handler))
        return f"http://127.0.0.1:{srv.server_address[1]}/"

    start.handlers = lambda: [h for _, h in servers]
    yield start
    for srv, _ in servers:
        srv.shutdown()
        srv.server_close()


def _copy(dst: Path, skip: tuple[str, ...] = ()) -> Path:
    for f in FILES:
        if f.rel not in skip:
            (dst / f.rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(SHARED / f.rel, dst / f.rel)
    return dst


@pytest.fixture
def empty_dir(tmp_path, monkeypatch):
    d = tmp_path / "data"
    monkeypatch.setenv("CYCLEQD_DATA_DIR", str(d))
    monkeypatch.delenv(datasets.MIRROR_ENV, raising=False)
    return d


@needs_shared
def test_catalogue_checksums_match_the_stored_files():
    for f in FILES:
        assert file_status(f, SHARED) == "present", f.rel
    stored = (SHARED / "mbpp/sanitized-mbpp.jsonl").read_bytes()
    assert mbpp_sanitized_to_jsonl(stored) == stored     # the conversion is idempotent
    # upstream's form of task 2 (google-research sanitized-mbpp.json) -> the stored line
    first = json.loads(stored.splitlines()[0])
    upstream = [{"source_file": "Benchmark Questions Verification V2.ipynb", "task_id": 2,
                 "prompt": first["text"], "code": first["code"], "test_imports": [],
                 "test_list": first["test_list"]}]
    assert mbpp_sanitized_to_jsonl(json.dumps(upstream).encode()) == stored.splitlines(keepends=True)[0]
    for d in CATALOGUE.values():
        for f in d.files:
            assert (f.url is None) == bool(f.mirror_only), f.rel
            assert f.url is None or any(c in f.url for c in ("/raw/", "raw.githubusercontent.com")), f.url


@needs_shared
def test_fetch_from_mirror_into_an_empty_data_dir(tmp_path, empty_dir, serve, monkeypatch):
    from cycleqd.skills.agentbench.data import load_dbbench_all, load_os
    from cycleqd.skills.coding.data import load_mbpp

    monkeypatch.setenv(datasets.MIRROR_ENV, serve(_copy(tmp_path / "srv")).rstrip("/"))
    lines: list[str] = []
    got = datasets.fetch(list(CATALOGUE), progress=False, log=lines.append)
    assert sorted(got) == sorted(empty_dir / f.rel for f in FILES)
    assert all(file_status(f) == "present" for f in FILES)
    assert any("fetching mbpp/sanitized-mbpp.jsonl from http://127.0.0.1:" in x for x in lines)
    assert not list(empty_dir.rglob("*.part"))
    n = len(serve.handlers()[0].requests)
    assert n == len(FILES) and datasets.fetch(list(CATALOGUE), progress=False, log=lines.append) == []
    assert len(serve.handlers()[0].requests) == n      # nothing fetched twice
    assert len(load_mbpp(split="all")) == 427 and len(load_dbbench_all()) == 300
    assert len(load_os(split="search")) == 100 and len(load_os(split="all")) == 1000


@needs_shared
def test_corrupted_download_is_refused_and_nothing_kept(tmp_path, empty_dir, serve, monkeypatch, capsys):
    srv = _copy(tmp_path / "srv")
    bad = srv / "dbbench/standard.jsonl"
    raw = bytearray(bad.read_bytes())
    raw[100] ^= 1                                           # same size, one bit flipped
    bad.write_bytes(bytes(raw))
    url = serve(srv)
    monkeypatch.setenv(datasets.MIRROR_ENV, url)
    entry = CATALOGUE["dbbench"].files[0]
    with pytest.raises(ChecksumError) as e:
        datasets.fetch(["dbbench"], progress=False, log=lambda s: None)
    msg = str(e.value)
    assert "dbbench/standard.jsonl" in msg and entry.sha256 in msg and url + entry.rel in msg
    assert "\n" not in msg and "got" in msg
    assert list(empty_dir.rglob("*")) == [empty_dir / "dbbench"]   # folder made, no file, no temp file
    # the CLI: one line, exit 2, nothing kept; a good file fetched in the same call stays
    assert cli_main(["data", "fetch", "mbpp", "dbbench", "--no-progress", "--data-dir", str(empty_dir)]) == 2
    err = capsys.readouterr().err
    assert "checksum mismatch for dbbench/standard.jsonl" in err
    assert (empty_dir / "mbpp/sanitized-mbpp.jsonl").is_file() and not (empty_dir / entry.rel).exists()
    assert not list(empty_dir.rglob("*.part"))


@needs_shared
def test_missing_upstream_file_and_mirror_only_files(tmp_path, empty_dir, serve, monkeypatch):
    with pytest.raises(DataError, match="pickle"):       # no public URL and no mirror: says why
        datasets.fetch(["official-os"], progress=False, log=lambda s: None)
    monkeypatch.setenv(datasets.MIRROR_ENV, serve(_copy(tmp_path / "srv", skip=("os_interaction/dev.json",))))
    with pytest.raises(DataError, match=r"os_interaction/dev.json: HTTP 404"):
        datasets.fetch(["os"], progress=False, log=lambda s: None)
    assert (empty_dir / "os_interaction/training.json").is_file()
    assert not (empty_dir / "os_interaction/dev.json").exists() and not list(empty_dir.rglob("*.part"))


def test_missing_data_is_one_error_naming_every_file_and_the_command(empty_dir, tmp_path, capsys):
    from cycleqd.skills.coding.data import load_mbpp

    with pytest.raises(DataMissingError) as e:
        datasets.require(["mbpp", "dbbench", "os"])
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError) and "\n" not in msg
    for f in ("mbpp/sanitized-mbpp.jsonl", "dbbench/standard.jsonl", "os_interaction/training.json",
              "os_interaction/dev.json"):
        assert f in msg
    assert "`cycleqd data fetch mbpp dbbench os`" in msg and str(empty_dir) in msg
    with pytest.raises(FileNotFoundError, match="cycleqd data fetch mbpp`"):
        load_mbpp()
    with pytest.raises(DataError, match="unknown data set 'nope'"):
        datasets.require(["nope"])
    # a run: refused before any model, one message for all its skills
    cfg = tmp_path / "run.yaml"
    run = tiny_config_dict(tmp_path / "cache")
    run["skills"] = [{"name": "c", "type": "mbpp"}, {"name": "d", "type": "dbbench"},
                     {"name": "o", "type": "os", "params": {"data_path": str(tmp_path)}}]
    cfg.write_text(json.dumps(run))
    assert cli_main(["run", str(cfg), "--data-dir", str(empty_dir), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "`cycleqd data fetch mbpp dbbench`" in err[-1]
    assert not (tmp_path / "r").exists()


@needs_shared
def test_data_list_and_fetch_cli(tmp_path, empty_dir, serve, monkeypatch, capsys):
    assert cli_main(["data", "list", "--data-dir", str(empty_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert str(empty_dir) in out[0]
    rows = {ln.split()[0] + ":" + ln.split()[4]: ln.split() for ln in out[2:]}
    assert len(rows) == len(FILES) and all(r[1] == "missing" for r in rows.values())
    mb = rows["mbpp:" + str(empty_dir / "mbpp/sanitized-mbpp.jsonl")]
    assert mb[2:4] == ["0.23", "MB"] and CATALOGUE["mbpp"].files[0].url in mb
    monkeypatch.setenv(datasets.MIRROR_ENV, serve(_copy(tmp_path / "srv")))
    assert cli_main(["data", "fetch", "--no-progress", "--data-dir", str(empty_dir)]) == 0   # the demo's sets
    assert f"4 file(s) fetched into {empty_dir}" in capsys.readouterr().out    # mbpp, dbbench, os (2 files)
    assert cli_main(["data", "list", "--data-dir", str(empty_dir)]) == 0
    status = {ln.split()[4]: ln.split()[1] for ln in capsys.readouterr().out.splitlines()[2:]}
    want = {str(empty_dir / f.rel) for n in DEFAULT_DATASETS for f in CATALOGUE[n].files}
    assert {p for p, s in status.items() if s == "present"} == want
    (empty_dir / "mbpp/sanitized-mbpp.jsonl").write_text("{}\n")
    cli_main(["data", "list", "--data-dir", str(empty_dir)])
    assert "differs" in capsys.readouterr().out


@needs_shared
def test_demo_fetches_missing_data_before_any_model_work(tmp_path, empty_dir, serve, monkeypatch):
    from cycleqd.demo import llm
    from cycleqd.demo.config import TOY_CONFIG, load_demo_config

    url = serve(_copy(tmp_path / "srv"))
    monkeypatch.setenv(datasets.MIRROR_ENV, url)

    class Stop(Exception):
        pass

    def first_model_step(*a, **k):   # the first step after the data: evaluators, then the base
        assert all(file_status(f) == "present" for n in DEFAULT_DATASETS for f in CATALOGUE[n].files)
        raise Stop

    monkeypatch.setattr(llm, "test_skills", first_model_step)
    monkeypatch.setattr(llm, "resolve_base_dir", first_model_step)
    lines: list[str] = []
    with pytest.raises(Stop):
        llm.run_demo(load_demo_config(TOY_CONFIG, {"cache_dir": str(tmp_path / "cache")}), tmp_path / "out",
                     progress=False, log=lines.append)
    assert any(x.startswith("benchmark data: 4 file(s) missing") for x in lines)
    assert f"fetching dbbench/standard.jsonl from {url}dbbench/standard.jsonl" in lines


@needs_shared
def test_a_locally_changed_file_is_refetched_and_warned_about(tmp_path, empty_dir, serve, monkeypatch, capsys):
    """`data fetch` re-fetches a file whose checksum differs (saying so; the local file stays until
    the new one is verified); a run/demo reading it warns once."""
    import os

    from cycleqd.skills.coding.data import load_mbpp

    srv = _copy(tmp_path / "srv")
    _copy(empty_dir)
    rel = "mbpp/sanitized-mbpp.jsonl"
    good = (srv / rel).read_bytes()
    edited = b"".join(good.splitlines(keepends=True)[:-1])   # one task less, still valid
    (empty_dir / rel).write_bytes(edited)
    load_mbpp(split="all")
    os.utime(empty_dir / rel)
    load_mbpp(split="all")
    warn = [l for l in capsys.readouterr().err.splitlines() if "differs from the catalogue checksum" in l]
    assert len(warn) == 1 and str(empty_dir / rel) in warn[0] and "cycleqd data fetch mbpp" in warn[0]
    assert datasets.fetch(["mbpp"], progress=False, log=print) == []   # the demo's call: kept (warned)
    assert (empty_dir / rel).read_bytes() == edited
    # a mirror with a bad copy: refused, the local (edited) file is left as it was
    bad = tmp_path / "bad"
    _copy(bad)
    (bad / rel).write_bytes(good.replace(b"def ", b"def  ", 1))
    monkeypatch.setenv(datasets.MIRROR_ENV, serve(bad))
    assert cli_main(["data", "fetch", "mbpp", "--no-progress", "--data-dir", str(empty_dir)]) == 2
    assert (empty_dir / rel).read_bytes() == edited and not list(empty_dir.rglob("*.part"))
    capsys.readouterr()
    monkeypatch.setenv(datasets.MIRROR_ENV, serve(srv))
    assert cli_main(["data", "fetch", "mbpp", "dbbench", "--no-progress", "--data-dir", str(empty_dir)]) == 0
    out = capsys.readouterr().out
    assert f"{empty_dir / rel} differs from the catalogue checksum; re-fetching it" in out
    assert f"1 file(s) fetched into {empty_dir}" in out and "dbbench" not in out.replace(str(empty_dir), "")
    assert (empty_dir / rel).read_bytes() == good


@needs_shared
@pytest.mark.parametrize("rel, factor", [("dbbench/standard.jsonl", 1), ("mbpp/sanitized-mbpp.jsonl", 4)])
def test_an_oversized_download_stops_at_the_limit(tmp_path, empty_dir, serve, monkeypatch, rel, factor):
    """A mirror serving far more than the stored size (``factor`` times it for a file with a
    convert step) is cut off there: one error line, no ``.part``."""
    srv = _copy(tmp_path / "srv")
    f = next(x for x in FILES if x.rel == rel)
    assert (f.convert is not None) == (factor > 1)
    (srv / rel).write_bytes(b"x" * (f.size * factor + 3 * (1 << 16)))
    monkeypatch.setenv(datasets.MIRROR_ENV, serve(srv))
    with pytest.raises(DataError) as e:
        datasets.fetch_file(f, progress=False, log=lambda s: None)
    msg = str(e.value)
    assert f"sent more than {f.size * factor} bytes" in msg and "\n" not in msg
    assert not list(empty_dir.rglob("*.part")) and not (empty_dir / rel).exists()


def test_a_hung_mirror_times_out_says_it_retries(empty_dir, monkeypatch):
    """No answer: ``$CYCLEQD_FETCH_TIMEOUT`` seconds per try, a "retrying (2/2)" line, one error."""
    import socket
    import time

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)                                  # accepts connections, never answers
    try:
        monkeypatch.setenv(datasets.MIRROR_ENV, f"http://127.0.0.1:{s.getsockname()[1]}/")
        monkeypatch.setenv("CYCLEQD_FETCH_TIMEOUT", "0.3")
        lines: list[str] = []
        t = time.time()
        with pytest.raises(DataError, match="dbbench/standard.jsonl: download from .* failed"):
            datasets.fetch(["dbbench"], progress=False, log=lines.append)
        assert time.time() - t < 5
        assert "dbbench/standard.jsonl: retrying (2/2) after timeout (0.3s, CYCLEQD_FETCH_TIMEOUT)" in lines
        monkeypatch.setenv("CYCLEQD_FETCH_TIMEOUT", "soon")
        with pytest.raises(DataError, match="CYCLEQD_FETCH_TIMEOUT='soon'"):
            datasets.fetch(["dbbench"], progress=False, log=lines.append)
    finally:
        s.close()
    assert not list(empty_dir.rglob("*.part"))


@needs_shared
def test_fetched_files_are_readable_by_all(tmp_path, empty_dir, serve, monkeypatch):
    import os
    import stat

    monkeypatch.setenv(datasets.MIRROR_ENV, serve(_copy(tmp_path / "srv")))
    old = os.umask(0o022)
    try:
        got = datasets.fetch(["os"], progress=False, log=lambda s: None)
    finally:
        os.umask(old)
    assert got and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in got)
    assert stat.S_IMODE(got[0].parent.stat().st_mode) == 0o755


def test_official_protocol_and_mbppplus_need_their_own_data_sets():
    """A run on the official protocol checks (and fetches) the official files, not the
    project's: missing official data is named before any model work."""
    from types import SimpleNamespace as S

    from cycleqd.datasets import names_for_skills

    assert names_for_skills([S(type="dbbench", params={})]) == ["dbbench"]
    assert names_for_skills([S(type="dbbench", params={"protocol": "official"}),
                             S(type="os", params={"protocol": "official"})]) == \
        ["official-db", "official-ids", "official-os"]
    assert set(names_for_skills([S(type="mbppplus", params={})])) == {"mbpp", "mbppplus"}
    assert names_for_skills([S(type="mbppplus", params={"data_path": "x"})]) == []
