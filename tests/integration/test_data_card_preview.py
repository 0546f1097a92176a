"""The data card page (data_card.html, token_lengths.png) and `tunegate data-preview` on the tiny project.

The preview must agree with training: its supervised-token count for a row is the number of label != -100
positions `recipes.sft.tokenize_rows` gives that row, and its HTML marks exactly the answer (and its
end-of-turn token) as supervised.
"""

import base64
import json
import re
from html.parser import HTMLParser

from conftest import chat
from typer.testing import CliRunner

from tunegate import TunegateError
from tunegate.cli import app
from tunegate.config import load_project
from tunegate.data.format import IGNORE_INDEX
from tunegate.pipeline import run_pipeline
from tunegate.recipes.sft import tokenize_rows

LONG_ANSWER = " ".join(["word"] * 80)


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _append(project_dir, *rows):
    with open(project_dir / "train.jsonl", "a") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _n_supervised(tokenizer, row, max_length, policy):
    labels = tokenize_rows(tokenizer, [row], max_length, policy)["labels"][0]
    return sum(1 for x in labels if x != IGNORE_INDEX)


def _preview(project_dir, *args):
    r = CliRunner().invoke(app, ["data-preview", str(project_dir / "tunegate.yaml"), *map(str, args)])
    return r


def _sections(output):
    """Terminal output -> {row id: its section, from its header line "── id  (split, file:line)" on}."""
    parts = re.split(r"^── (\S+)  (\(.*)$", output, flags=re.MULTILINE)
    return {rid: header + body for rid, header, body in zip(parts[1::3], parts[2::3], parts[3::3])}


class _Spans(HTMLParser):
    """Per preview section: the text inside supervised spans and inside masked spans of its <pre class="row">."""

    def __init__(self):
        super().__init__()
        self.rows, self._id, self._cls = {}, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section" and a.get("class") == "preview":
            self._id = a["data-id"]
            self.rows[self._id] = {"sup": [], "ctx": []}
        elif tag == "span" and self._id and a.get("class") in ("sup", "ctx"):
            self._cls = a["class"]

    def handle_endtag(self, tag):
        if tag == "span":
            self._cls = None

    def handle_data(self, data):
        if self._cls:
            self.rows[self._id][self._cls].append(data)


def test_data_card_html_has_histogram_steps_sources_duplicates_pii_and_licence(tiny_project):
    _append(tiny_project, "{not json", chat("message number 0 about topic alpha", "alpha", "t0-copy"),
            chat("write to ann@example.com about topic beta", "beta", "mail"))
    overrides = ["data.dedup={one_word_variants: false}", "data.max_rejected_fraction=0.2", "data.sources.0.license=CC-BY-4.0",
                 "data.pii={mode: mask, entities: [EMAIL_ADDRESS]}"]
    run_pipeline(load_project(tiny_project / "tunegate.yaml", overrides), until="data")
    out = tiny_project / "runs/default/data"
    html = (out / "data_card.html").read_text()
    stats = json.loads((out / "stats.json").read_text())

    # the histogram: written as a file and embedded, byte for byte
    png = (out / "token_lengths.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}"' in html

    # per source: 63 read = 60 + a bad line + a copy + a PII row; 61 kept; 2 rejected (the copy, the bad line)
    src = stats["per_source"][str(tiny_project / "train.jsonl")]
    assert (src["rows_read"], src["kept"], src["rejected"], src["train"] + src["val"]) == (63, 61, 2, 61)
    table = re.search(r'<table id="per-source">(.*?)</table>', html, re.DOTALL).group(1)
    cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", table, re.DOTALL)]
    assert cells == ["train.jsonl", "CC-BY-4.0", "63", "61", str(src["train"]), str(src["val"]), "2", "duplicate 1, invalid_json 1"]

    # rows in and out per step, with the rule that removed them
    assert [(s["rows_in"], s["rows_out"], s["removed_by_rule"]) for s in stats["steps"]] == [
        (63, 62, {"invalid_json": 1}), (62, 62, {}), (62, 62, {}), (62, 61, {"duplicate": 1}), (61, 61, {}), (61, 61, {})]
    assert [s["step"] for s in stats["steps"]][-2:] == ["golden-set overlap", "golden-set n-gram overlap (13-word)"]
    assert "<td>PII (mask)</td><td class=\"n\">62</td><td class=\"n\">62</td>" in html
    # wall time per step: timings.json and a column of the steps table
    timings = json.loads((out / "timings.json").read_text())
    assert [t["step"] for t in timings["steps"]] == [s["step"] for s in stats["steps"]] + ["split and write"]
    assert all(t["seconds"] >= 0 for t in timings["steps"]) and timings["total_seconds"] > 0
    pii_row = re.search(r"<tr><td>PII \(mask\)</td>(.*?)</tr>", html).group(1)
    assert re.findall(r"<td[^>]*>(.*?)</td>", pii_row)[-1] == str(timings["steps"][1]["seconds"])
    # removal reasons, duplicates with an example, PII by type, licences
    assert "<code>invalid_json</code></td><td class=\"n\">1</td>" in html
    assert ("<td>exact</td><td><code>t0-copy</code></td><td><code>t0</code></td><td class=\"n\">1.0</td>"
            "<td>message number 0 about topic alpha alpha</td><td>message number 0 about topic alpha alpha</td>") in html
    assert stats["duplicate_examples"] == [{"kind": "exact", "id": "t0-copy", "duplicate_of": "t0", "similarity": 1.0,
                                            "text": "message number 0 about topic alpha alpha", "kept_text": "message number 0 about topic alpha alpha"}]
    assert "| exact | t0-copy | t0 | 1.0 |" in (out / "data_card.md").read_text()
    assert "<tr><td>EMAIL_ADDRESS</td><td class=\"n\">1</td><td class=\"n\">0</td></tr>" in html
    assert "<h2>Licences</h2>\n<p>CC-BY-4.0." in html
    assert "ann@example.com" not in html  # rejected or redacted text never reaches the page
    md = (out / "data_card.md").read_text()
    assert "| read and validate structure | 63 | 62 | invalid_json 1 |" in md and "- duplicates removed: 1 exact, 0 near" in md


def test_preview_counts_and_marks_exactly_what_training_supervises(tiny_project, tokenizer):
    _append(tiny_project, chat("is <script>alert(1)</script> & co safe?", "no", "html"),
            chat("tell me a story", LONG_ANSWER, "long"))  # 'long' is over max_length 64: dropped (policy drop)
    project = load_project(tiny_project / "tunegate.yaml")
    run_pipeline(project, until="data")
    train = _rows(tiny_project / "runs/default/data/train.jsonl")
    by_id = {r["id"]: r for r in train + _rows(tiny_project / "runs/default/data/val.jsonl")}
    ids = [train[0]["id"], train[1]["id"], "html"]
    html_file = tiny_project / "preview.html"
    r = _preview(tiny_project, "--rows", ",".join([*ids, "long"]), "--html", html_file)
    assert r.exit_code == 0, r.output
    sections = _sections(r.stdout)
    assert list(sections) == [*ids, "long"]
    page = _Spans()
    page.feed(html_file.read_text())
    for rid in ids:
        row = by_id[rid]
        expected = _n_supervised(tokenizer, row, project.data.max_length, project.data.overlength)
        assert f"supervised {expected}," in sections[rid]
        assert "runs/default/data/" in sections[rid].splitlines()[0]  # read from the finished stage
        assert "not truncated" in sections[rid]
        user, answer = row["messages"][0]["content"], row["messages"][-1]["content"]
        assert f"⟦{answer}<|im_end|>⟧" in sections[rid]  # no colour (not a terminal): supervised text between ⟦ ⟧
        assert "".join(page.rows[rid]["sup"]) == answer + "<|im_end|>"
        assert user not in "".join(page.rows[rid]["sup"]) and user in "".join(page.rows[rid]["ctx"])
        assert int(re.search(rf'data-id="{rid}">.*?class="n-supervised">(\d+)<', html_file.read_text(), re.DOTALL).group(1)) == expected
    raw = html_file.read_text()
    assert "<script>" not in raw and "&lt;script&gt;" in raw  # escaped
    # a row the data stage rejected is shown as rejected, with its rule
    assert "REJECTED, not trained on: overlength" in sections["long"]


def test_preview_reports_truncated_rows(tiny_project, tokenizer):
    _append(tiny_project, chat("tell me a story", LONG_ANSWER, "long"))
    overrides = ["data.max_length=48", "data.overlength=truncate_end"]
    project = load_project(tiny_project / "tunegate.yaml", overrides)
    row = chat("tell me a story", LONG_ANSWER, "long")
    expected = _n_supervised(tokenizer, row, 48, "truncate_end")

    # no data stage yet: the rows come from the source, through the same code
    r = _preview(tiny_project, *overrides, "--rows", "long,t1")
    assert r.exit_code == 0, r.output
    s = _sections(r.stdout)
    assert re.search(r"TRUNCATED: \d+ -> 48 tokens", s["long"]) and f"supervised {expected}," in s["long"]
    assert "cut from the end" in s["long"] and "not truncated" in s["t1"]

    # after the data stage, from train.jsonl / val.jsonl, and the same in the HTML page
    run_pipeline(project, until="data")
    html_file = tiny_project / "p.html"
    r = _preview(tiny_project, *overrides, "--rows", "long", "--html", html_file)
    assert r.exit_code == 0, r.output
    s = _sections(r.stdout)
    assert "runs/default/data/" in r.stdout and re.search(r"TRUNCATED: \d+ -> 48 tokens", s["long"])
    assert f"supervised {expected}," in s["long"]
    assert 'class="cut status">TRUNCATED' in html_file.read_text()


def test_preview_unknown_row_id_names_the_file_and_some_ids(tiny_project):
    r = _preview(tiny_project, "--rows", "t1,nope")
    assert isinstance(r.exception, TunegateError)
    msg = str(r.exception)
    assert "train.jsonl" in msg and "'nope'" in msg and "t0, t1, t2" in msg
    r = _preview(tiny_project, "--first", "2")
    assert r.exit_code == 0 and list(_sections(r.stdout)) == ["t0", "t1"]
