"""Every HTML page of two tiny runs, opened in headless Chromium through Playwright: each link resolves to a file
that exists, nothing is wider than the window (nor a table, pre or image wider than its container), every page
carries the one header, and run.js fills it in. A screenshot of each page lands in `runs/screenshots/` of the
test's project (look at them: `pytest --basetemp=/tmp/x`).

Skipped, with the reason, when Playwright for Python or Debian's /usr/bin/chromium is missing; with
TUNEGATE_REQUIRE_BROWSER=1 that is a failure instead. Browsers are never downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tunegate.config import load_project
from tunegate.pipeline import run_pipeline

from conftest import make_tiny_project

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("TUNEGATE_CHROMIUM", "/usr/bin/chromium"))
WIDTH = 1280
AUDIT = "audit:\n  dev_rows: 10\n  shots: [0]\n  probe: {max_steps: 2, rows: 20}\n"


def _missing(why: str):
    if os.environ.get("TUNEGATE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{why} (TUNEGATE_REQUIRE_BROWSER=1)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed: pip install playwright (never `playwright install`: it uses /usr/bin/chromium)")
    if not CHROMIUM.is_file():
        _missing(f"{CHROMIUM} not found: apt-get install chromium (or set TUNEGATE_CHROMIUM)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir):
    """Run `a` (audit on, trained anyway) and run `b`: a copy of `a` with eval.max_new_tokens=3, so only its eval
    and report stages rerun; then the data preview, runs/index.html and runs/compare-a.vs.b.html."""
    from tunegate import runs
    from tunegate.preview import run_preview

    root = make_tiny_project(tmp_path_factory.mktemp("pages"), tiny_model_dir)
    yaml = root / "tunegate.yaml"
    yaml.write_text(yaml.read_text().replace("audit:\n  enabled: false\n", AUDIT) + "task: {kind: classification}\n")  # per-label table
    run_pipeline(load_project(yaml), run_id="a", train_anyway=True)
    shutil.copytree(root / "runs" / "a", root / "runs" / "b")
    run_pipeline(load_project(yaml, ["eval.max_new_tokens=3"]), run_id="b", train_anyway=True)
    project = load_project(yaml)
    run_preview(project, root / "runs" / "a", None, 3, root / "runs" / "a" / "preview.html")
    for offset, rid in enumerate(("s1", "s2")):
        long_answers(root / "runs" / "a" / "eval", root / "runs" / rid / "eval", offset)
    runs.write_index(project, runs.list_runs(project))
    runs.write_compare(project, runs.compare_runs(project, "a", "b"))
    runs.write_compare(project, runs.compare_runs(project, "s1", "s2"))
    return root


# Answers a random tiny model never writes: one unbroken 3,000-character token, a long paragraph, a short correct
# answer, a long URL, whitespace only. The pages must show each whole (or cut with a visible "…") and stay in the window.
LONG = ["x" * 3000, ("The answer, explained at length. " * 60).strip(), "alpha", "https://example.org/" + "a/b-c_d" * 80, "\n\n"]


def long_answers(src, dst, offset):
    """An eval folder `dst` (no manifest) made of `src`'s files with the candidate's answers from LONG and alternating
    scores, and its eval.html."""
    from tunegate.core.io import atomic_write_jsonl, read_jsonl
    from tunegate.report.eval import write_eval_report

    dst.mkdir(parents=True)
    for name in ("scores.json", "verdict.json"):
        shutil.copy(src / name, dst / name)
    rows = read_jsonl(src / "samples.jsonl")
    for k, r in enumerate(rows):
        r["candidate_output"] = LONG[(k + offset) % len(LONG)]
        r["candidate_exact_match"] = float((k + offset) % 2)
    atomic_write_jsonl(dst / "samples.jsonl", rows)
    write_eval_report(dst, "tiny")


PAGES = ["a/data/data_card.html", "a/audit/audit.html", "a/eval/eval.html", "a/report/report.html", "a/preview.html",
         "b/eval/eval.html", "b/report/report.html", "s2/eval/eval.html", "index.html", "compare-a.vs.b.html", "compare-s1.vs.s2.html"]

# Links, images and scripts the page holds after its scripts ran; overflow: the page and each wide element.
CHECK_JS = """() => {
  const refs = [...document.querySelectorAll('a[href]')].map(e => e.href)
    .concat([...document.querySelectorAll('img[src], script[src]')].map(e => e.src));
  const wide = [];
  for (const el of document.querySelectorAll('table, pre, img, header, details, div.t')) {
    const parent = el.parentElement, box = el.getBoundingClientRect(), pbox = parent.getBoundingClientRect();
    const pad = parseFloat(getComputedStyle(parent).paddingRight) || 0;
    if (box.width > 0 && box.right > pbox.right - pad + 1)
      wide.push(el.tagName + (el.id ? '#' + el.id : '') + ' ' + Math.round(box.right) + ' > ' + Math.round(pbox.right - pad));
    if (el.tagName === 'PRE' && el.scrollWidth > el.clientWidth + 1) wide.push('PRE scrolls ' + el.scrollWidth + ' > ' + el.clientWidth);
  }
  const stages = [...document.querySelectorAll('header.tg [data-tg-stage]')].map(e => e.textContent.trim());
  return {refs, wide, scroll: document.documentElement.scrollWidth, width: window.innerWidth, stages,
          headers: document.querySelectorAll('header.tg').length};
}"""


def test_every_page_renders_with_working_links_no_overflow_and_the_live_header(browser, two_runs):
    from urllib.parse import unquote, urlparse

    runs_dir = two_runs / "runs"
    shots = runs_dir / "screenshots"
    shots.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": WIDTH, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    problems = []
    for rel in PAGES:
        path = runs_dir / rel
        assert path.is_file(), rel
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
        got = page.evaluate(CHECK_JS)
        page.screenshot(path=str(shots / (rel.replace("/", "_") + ".png")), full_page=True)
        assert got["headers"] == 1, f"{rel}: {got['headers']} page headers"
        for ref in got["refs"]:
            u = urlparse(ref)
            if u.scheme == "data":
                continue
            if u.scheme != "file" or not Path(unquote(u.path)).is_file():
                problems.append(f"{rel}: link to {ref} does not resolve to a file")
        if got["scroll"] > got["width"]:
            problems.append(f"{rel}: page is {got['scroll']} px wide in a {got['width']} px window")
        problems += [f"{rel}: {w}" for w in got["wide"]]
        if rel.startswith(("a/", "b/")):  # run.js (rewritten by `runs`) filled in every stage, measured against the project
            states = dict(s.split(" ")[:2] for s in got["stages"])
            assert states["release"] == states["data"] == states["train"] == "done", f"{rel}: {got['stages']}"  # the runs passed: signed
            # b's eval ran with eval.max_new_tokens=3, which the project file does not say
            assert states["eval"] == ("stale" if rel.startswith("b/") else "done"), f"{rel}: {got['stages']}"
    for rel in ("s2/eval/eval.html", "compare-s1.vs.s2.html"):  # long answers: whole in the page, "…" where cut
        html = (runs_dir / rel).read_text()
        assert LONG[0] in html and LONG[3] in html and "show all 3000 characters" in html and "only whitespace" in html, rel
        assert "<div class=\"t\">alpha</div>" in html, rel
    page.close()
    assert not errors, errors
    assert problems == [], "\n".join(problems)


def test_runs_list_and_compare_through_the_cli(two_runs):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"), COLUMNS="200")
    r = subprocess.run([sys.executable, "-m", "tunegate.cli", "runs", two_runs, "--compare", "a", "b"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "eval.max_new_tokens" in r.stdout and "paired 95% CI" in r.stdout and "compare-a.vs.b.html" in r.stdout
    r = subprocess.run([sys.executable, "-m", "tunegate.cli", "runs", two_runs, "--compare", "a", "nope"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "--compare nope: no run" in r.stderr and "existing runs: a, b" in r.stderr, r.stderr


def test_the_checks_catch_a_wide_pre_a_wide_page_and_a_dead_link(browser, tmp_path):
    """The checks above can fail: a page with an unwrapped long line in a <pre>, a table wider than the window and
    a link to a missing file is reported on all three counts."""
    page_file = tmp_path / "bad.html"
    page_file.write_text("<!doctype html><body style='max-width:40rem'><header class='tg'></header><pre>" + "y" * 400
                         + "</pre><table><tr><td style='white-space:nowrap'>" + "z " * 900
                         + "</td></tr></table><a href='missing.html'>x</a></body>")
    page = browser.new_page(viewport={"width": WIDTH, "height": 900})
    page.goto(page_file.as_uri())
    got = page.evaluate(CHECK_JS)
    page.close()
    assert got["scroll"] > got["width"]
    assert any(w.startswith("PRE scrolls") for w in got["wide"]) and any(w.startswith("TABLE") for w in got["wide"])
    assert any(r.endswith("/missing.html") and not (tmp_path / "missing.html").exists() for r in got["refs"])
