"""The fuzz suite of issue 23: random and adversarial input through every reader, the template step, the data
stage and the CLI's identifiers, with Hypothesis (https://hypothesis.readthedocs.io).

What each property asserts:
- readers (JSONL, JSON array, CSV, TSV, Parquet): `read_source` on a whole file returns (a file-level
  refusal would be a TunegateError), and every row written is either a record or a rejection with a rule;
- the template step (format.encode_batch_fn, the real SmolLM2 tokenizer): every record read comes back kept or
  rejected with a rule, in order;
- the data stage (in-process, on a tiny project, every rejected fraction allowed): it finishes, and every
  non-blank input line is in train.jsonl, val.jsonl or rejected.jsonl;
- CLI identifiers (`--run-id`, tenant names) through `tunegate.cli.main`: exit 0, 1 or 2, never a traceback,
  and nothing is written or deleted outside the project.

The example counts are bounded so the suite takes about a minute (TUNEGATE_FUZZ_EXAMPLES scales them, e.g. 10
for a long local run); `pytest --hypothesis-show-statistics tests/unit/test_fuzz.py` prints how many inputs each
property tried. Rows are kept small by a max_row_bytes of 2,048, so "huge" costs kilobytes, not gigabytes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunegate.config import SourceConfig
from tunegate.data.records import read_source

SCALE = float(os.environ.get("TUNEGATE_FUZZ_EXAMPLES", "1"))
LIMIT = 2048  # max_row_bytes in these tests


def fuzz(n: int):
    """Hypothesis settings for a property tried on about `n` inputs (times TUNEGATE_FUZZ_EXAMPLES)."""
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# ---- rows: valid ones, and the adversarial kinds the issue lists ----------------------------------------------

texts = st.text(st.characters(codec="utf-8"), max_size=40)  # any Unicode scalar (no lone surrogate: not UTF-8)
valid_chat = st.builds(lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
                       texts, texts)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4), max_leaves=20)
wrong_shapes = st.one_of(
    json_values,
    st.builds(lambda m: {"messages": m}, json_values),
    st.builds(lambda role, c: {"messages": [{"role": role, "content": c}]}, texts, json_values),
)


def _line(value) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


adversarial_lines = st.one_of(
    valid_chat.map(_line),
    wrong_shapes.map(_line),
    st.one_of(st.integers(1, 1_200), st.integers(1, 50_000)).map(lambda n: b"[" * n + b"]" * n),  # nesting, up to past the parser
    st.integers(4_301, 20_000).map(lambda n: b'{"id": ' + b"9" * n + b"}"),  # an integer past int()'s digit limit
    st.sampled_from([b'{"messages": "\\ud800"}', b'{"messages": [{"role": "user", "content": "\\udfff x"}, '
                                                  b'{"role": "assistant", "content": "\\ud83d"}]}']),  # lone surrogates
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")),  # random bytes (invalid UTF-8, NUL, ...)
    st.text(st.characters(min_codepoint=0, max_codepoint=31), max_size=20).map(
        lambda t: json.dumps({"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "a" + t}]}).encode()),
    st.integers(LIMIT, 6 * LIMIT).map(lambda n: _line({"messages": [{"role": "user", "content": "x" * n},
                                                                     {"role": "assistant", "content": "a"}]})),
)


def _non_blank(lines: list[bytes], bom: bool = False) -> int:
    """Lines the reader sees as rows: not blank once the file's one byte-order mark is gone (written before the
    lines when `bom`, else a first line's own)."""
    return sum(1 for i, line in enumerate(lines) if (line.removeprefix(b"\xef\xbb\xbf") if i == 0 and not bom else line).strip())


def _accounted(src: SourceConfig, expected: int) -> tuple[list, list]:
    rows, rejected = read_source(src)  # every file written here is whole: no TunegateError (a file-level refusal)
    assert len(rows) + len(rejected) == expected, (len(rows), [(r.line, r.rule) for r in rejected])
    assert all(r.rule and r.line >= 1 for r in rejected)
    return rows, rejected


# ---- readers ------------------------------------------------------------------------------------------------

@fuzz(150)
@given(lines=st.lists(adversarial_lines, min_size=1, max_size=12), bom=st.booleans())
def test_fuzz_jsonl_every_line_is_a_record_or_a_rejection(tmp_path_factory, lines, bom):
    path = tmp_path_factory.mktemp("jsonl") / "a.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines) + b"\n")
    _accounted(SourceConfig(path=path, format="chat", max_row_bytes=LIMIT), _non_blank(lines, bom))


@fuzz(60)
@given(rows=st.lists(st.one_of(valid_chat, wrong_shapes), min_size=1, max_size=10))
def test_fuzz_json_array_every_element_is_a_record_or_a_rejection(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("json") / "a.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    _accounted(SourceConfig(path=path, format="chat", max_row_bytes=LIMIT), len(rows))


csv_fields = st.one_of(texts, st.integers(LIMIT, 3 * LIMIT).map(lambda n: "y" * n),
                       st.sampled_from(['"', '""', "a,b", "line\nbreak", "\r", "\x00", "\ufeff"]))


@fuzz(100)
@given(rows=st.lists(st.tuples(csv_fields, csv_fields), min_size=1, max_size=10),
       junk=st.lists(st.binary(max_size=40).map(lambda b: b"x" + b.replace(b"\n", b"").replace(b"\r", b"").replace(b'"', b"")),
                     max_size=3),
       tsv=st.booleans())
def test_fuzz_csv_every_row_is_a_record_or_a_rejection(tmp_path_factory, rows, junk, tsv):
    """Rows written by the csv module (quotes, separators, line breaks inside fields) plus raw byte lines."""
    buf = io.StringIO()
    # QUOTE_ALL: with lineterminator "\n" the csv module leaves a field of a bare "\r" unquoted (a line break to
    # any CSV reader); unquoted cells are exercised by the junk lines
    w = csv.writer(buf, delimiter="\t" if tsv else ",", lineterminator="\n", quoting=csv.QUOTE_ALL)
    w.writerow(["prompt", "completion"])
    w.writerows(rows)
    path = tmp_path_factory.mktemp("csv") / ("a.tsv" if tsv else "a.csv")
    path.write_bytes(buf.getvalue().encode("utf-8", "surrogatepass") + b"".join(j + b"\n" for j in junk))
    # A row over the limit, spanning lines or not, is one rejection: the reader keeps the parser's quote state
    # across the lines it does not keep, so the rows after it count exactly.
    got, rejected = read_source(SourceConfig(path=path, format="prompt_completion", max_row_bytes=LIMIT))
    assert len(got) + len(rejected) == len(rows) + len(junk), [(r.line, r.rule) for r in rejected]


@fuzz(40)
@given(rows=st.lists(st.one_of(valid_chat, st.builds(lambda t: {"messages": t}, texts)), min_size=1, max_size=8))
def test_fuzz_parquet_every_row_is_a_record_or_a_rejection(tmp_path_factory, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("pq") / "a.parquet"
    pq.write_table(pa.Table.from_pylist([{"row": json.dumps(r)} for r in rows]), path)
    # read the JSON of each row as `text` rows (the text format reads any column), so shapes vary freely
    _accounted(SourceConfig(path=path, format="text", text_column="row", max_row_bytes=LIMIT), len(rows))


label_answers = st.one_of(json_values, st.lists(st.sampled_from(["card", "how", "fee", "oos", "none", " Card ", ""]), max_size=4),
                          st.sampled_from(["card, how", "how,card", "none", ",,", "FEE", "oos"]))


@fuzz(120)
@given(answers=st.lists(label_answers, min_size=1, max_size=10), kind=st.sampled_from(["multilabel", "classification"]))
def test_fuzz_label_answers_are_kept_canonical_or_rejected_with_a_rule(tmp_path_factory, answers, kind):
    """A `task` reads answers as labels (lists, strings, null, anything): every row ends kept, in canonical form and
    free of its source's drop_labels, or rejected with a rule."""
    from tunegate.config import TaskConfig
    from tunegate.evals.labels import canonical_answer, label_set

    task = TaskConfig(kind=kind)
    path = tmp_path_factory.mktemp("labels") / "a.json"
    path.write_text(json.dumps([{"text": f"q{i}", "labels": a} for i, a in enumerate(answers)], ensure_ascii=False), encoding="utf-8")
    src = SourceConfig(path=path, format="csv", prompt_column="text", completion_column="labels", max_row_bytes=LIMIT,
                       drop_labels=["fee"], label_map={"how": "how_to"})
    src._task = task
    rows, _ = _accounted(src, len(answers))
    for r in rows:
        answer = r["messages"][-1]["content"]
        if kind == "multilabel":
            assert canonical_answer(answer, task) == answer and not label_set(answer, task) & {"fee", "how"}
        else:
            assert answer == answer.strip() and answer.lower() not in ("fee", "how")
            assert isinstance(answers[int(r["messages"][-2]["content"][1:])], str)  # a list is no single label


# ---- the template step --------------------------------------------------------------------------------------

@fuzz(60)
@given(lines=st.lists(adversarial_lines, min_size=1, max_size=8),
       policy=st.sampled_from(["drop", "truncate_end", "cut_context_left"]))
def test_fuzz_template_step_keeps_or_rejects_every_record(tmp_path_factory, base_dir, lines, policy):
    from tunegate.data.format import encode_batch_fn

    path = tmp_path_factory.mktemp("enc") / "a.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows, _ = read_source(SourceConfig(path=path, format="chat", max_row_bytes=LIMIT))
    out = _encoder(str(base_dir), policy)(rows)
    assert len(out) == len(rows)
    assert all(o[0] == "kept" or (o[0] == "rejected" and o[1]) for o in out)
    del encode_batch_fn


_ENCODERS: dict = {}


def _encoder(base: str, policy: str):
    from tunegate.data.format import encode_batch_fn

    if (base, policy) not in _ENCODERS:
        _ENCODERS[base, policy] = encode_batch_fn(base, "auto", 64, policy)
    return _ENCODERS[base, policy]


# ---- the data stage, end to end -----------------------------------------------------------------------------

@pytest.mark.slow
@fuzz(8)
@given(lines=st.lists(adversarial_lines, min_size=1, max_size=10))
def test_fuzz_data_stage_accounts_for_every_line(tmp_path_factory, tiny_project_factory, lines):
    """The data stage in-process on a tiny project (60 good rows) plus adversarial lines: it finishes, and every
    non-blank line is kept or rejected."""
    from tunegate.config import load_project
    from tunegate.core.io import read_jsonl
    from tunegate.pipeline import run_pipeline

    root = tiny_project_factory(tmp_path_factory.mktemp("stage"))
    src = root / "train.jsonl"
    good = src.read_bytes().splitlines()
    src.write_bytes(b"\n".join(good + lines) + b"\n")
    cfg = root / "tunegate.yaml"
    cfg.write_text(cfg.read_text().replace("format: chat}]", f"format: chat, max_row_bytes: {LIMIT}}}]", 1))
    project = load_project(cfg, ["data.max_rejected_fraction=1.0", "data.num_proc=1"])
    run_pipeline(project, until="data")  # 60 good rows, max_rejected_fraction 1.0: it must finish
    out = root / "runs" / "default" / "data"
    kept = sum(len(read_jsonl(out / f"{s}.jsonl")) for s in ("train", "val"))
    assert kept + len(read_jsonl(out / "rejected.jsonl")) == _non_blank(good + lines)


# ---- identifiers on the command line ------------------------------------------------------------------------

identifiers = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["..", ".", "../..", "data", "runs", "/tmp", "~", "a/../../b", "x" * 200, "-h", "--force", "\x00"]),
    st.builds(lambda a, b: f"{a}/{b}", st.text(max_size=4), st.text(max_size=4)),
)


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@fuzz(60)
@given(ident=identifiers, command=st.sampled_from(["eval", "report", "promote", "docs", "data-preview", "tenants"]))
def test_fuzz_cli_identifiers_never_write_outside_the_project(tmp_path_factory, monkeypatch, ident, command):
    """Random `--run-id`s and tenant names: exit 0, 1 or 2 and never a traceback; outside the project nothing
    appears or changes, and inside it nothing that was there is deleted."""
    from tunegate import cli

    sandbox = tmp_path_factory.mktemp("cli")
    root = sandbox / "project"
    (root / "data").mkdir(parents=True)
    chat = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    (root / "data" / "train.jsonl").write_text(chat + "\n")
    (root / "data" / "golden.jsonl").write_text(chat + "\n")
    (root / "tunegate.yaml").write_text("name: p\ndata:\n  sources: [{path: data/train.jsonl}]\n  golden: {path: data/golden.jsonl}\n")
    (sandbox / "outside.txt").write_text("keep")
    before_out = _snapshot(sandbox)
    args = (["tenants", "add", str(root / "tunegate.yaml"), ident] if command == "tenants"
            else [command, str(root / "tunegate.yaml"), "--run-id", ident])
    monkeypatch.setattr(sys, "argv", ["tunegate", *args])
    monkeypatch.chdir(sandbox)
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    assert code in (0, 1, 2)
    after = _snapshot(sandbox)
    outside = {k: v for k, v in after.items() if not k.startswith("project/")}
    assert outside == {k: v for k, v in before_out.items() if not k.startswith("project/")}
    assert all(k in after for k in before_out)  # nothing deleted inside
