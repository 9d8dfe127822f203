"""Issue 18 item 7: run and skill names (and every other string from the run's files) reach
report.html / report.md only as inert text."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from cycleqd.config import parse_config
from cycleqd.engine.build import build_components
from cycleqd.engine.loop import run_cycleqd
from cycleqd.engine.report import write_report
from tests.conftest import tiny_config_dict

RUN_NAME = "<img src=x onerror=alert(1)>[click](javascript:alert(2))"
SKILLS = ["<script>alert(3)<\\script>", "[x](javascript:alert(4))", "\"><svg onload=alert(5)>`|*_"]
ALLOWED = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "code", "strong", "table",
           "thead", "tbody", "tr", "th", "td", "img"}


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]

    def handle_data(self, data):
        self.text.append(data)


def _check_html(page: str):
    c = Collect()
    c.feed(page)
    assert set(c.tags) <= ALLOWED, set(c.tags) - ALLOWED
    for tag, k, v in c.attrs:
        assert not k.startswith("on"), (tag, k, v)
        assert k != "href", (tag, k, v)
        if tag == "img":
            assert k in ("alt", "src") and (k == "alt" or v.startswith("maps/")), (k, v)
    return "".join(c.text)


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    d = tiny_config_dict(tmp / "cache", generations=3)
    d["name"] = RUN_NAME
    for s, n in zip(d["skills"], SKILLS):
        s["name"] = n
    cfg = parse_config(d)
    run_cycleqd(build_components(cfg), cfg, tmp / "run", progress=False)
    write_report(tmp / "run")
    return tmp / "run"


def test_html_report_escapes_hostile_names(hostile_run):
    page = (hostile_run / "report.html").read_text()
    text = _check_html(page)
    for s in [RUN_NAME] + SKILLS:
        assert s in text  # shown, as text


def test_markdown_report_renders_inert(hostile_run):
    markdown = pytest.importorskip("markdown")
    md = (hostile_run / "report.md").read_text()
    assert "<img src=x" not in md and "<script>" not in md
    text = _check_html("<html><body>" + markdown.markdown(md, extensions=["tables"]) + "</body></html>")
    assert RUN_NAME in text
