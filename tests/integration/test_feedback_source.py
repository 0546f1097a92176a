"""The next round from served feedback (issue 22, item 3): a data source `{feedback: sft|preference|kto}` reads what
`tunegate data feedback` exports, and `tunegate data` / `tunegate run` export it anew from the serving database
first, so a rating given since the last run is in the next one."""

import json

import pytest
from typer.testing import CliRunner

from tunegate.cli import app as cli_app
from pydantic import ValidationError

from tunegate import TunegateError
from tunegate.config import SourceConfig, load_project
from tunegate.serve import db as servedb

MSGS = [{"role": "user", "content": "message number 7 about topic beta, please"}]


def _serve_feedback(root, edits, version="tiny-v1", adapter="tiny", first=0):
    """A serving database beside the project with one trace per edit (answered by `version`) and the edit as feedback."""
    eng = servedb.connect(servedb.default_url(root))
    for i, edit in enumerate(edits, start=first):
        tid = f"chatcmpl-{i}"
        servedb.write_trace(eng, id=tid, tenant="acme", model=adapter or "base", adapter=adapter, adapter_sha256="ab" * 32,
                            messages=MSGS, params={}, response="alpha", finish_reason="stop", prompt_tokens=9,
                            completion_tokens=1, latency_ms=3.0, version=version)
        servedb.record_feedback(eng, "acme", tid, "down", edit, None)


def _with_feedback_source(root, kind="sft"):
    cfg = root / "tunegate.yaml"
    cfg.write_text(cfg.read_text().replace("sources: [{path: train.jsonl, format: chat}]",
                                           f"sources: [{{path: train.jsonl, format: chat}}, {{feedback: {kind}}}]"))
    return cfg


def _kept(root):
    rows = [json.loads(x) for x in (root / "runs/default/data/train.jsonl").read_text().splitlines()]
    rows += [json.loads(x) for x in (root / "runs/default/data/val.jsonl").read_text().splitlines()]
    return rows


def test_config_feedback_source_sets_path_and_format(tiny_project):
    p = load_project(_with_feedback_source(tiny_project, "sft"))
    src = p.data.sources[1]
    assert (src.feedback, src.format, src.path) == ("sft", "chat", tiny_project / "feedback" / "sft.jsonl")
    pref = SourceConfig.model_validate({"feedback": "preference"})
    assert (pref.format, str(pref.path)) == ("preference", "feedback/preference.jsonl")
    with pytest.raises(ValidationError, match="give no `path`"):
        SourceConfig.model_validate({"feedback": "sft", "path": "x.jsonl"})
    with pytest.raises(ValidationError, match="rows are format kto, not chat"):
        SourceConfig.model_validate({"feedback": "kto", "format": "chat"})
    # a preference source on an SFT project is refused at load time, naming the method's formats
    cfg = tiny_project / "tunegate.yaml"
    cfg.write_text(cfg.read_text().replace("{feedback: sft}", "{feedback: preference}"))
    with pytest.raises(TunegateError, match="train.method sft cannot train on"):
        load_project(cfg)


def test_data_stage_trains_on_edits_collected_since_the_last_run(tiny_project):
    cfg = _with_feedback_source(tiny_project)
    runner = CliRunner()
    # Round 1: no serving database yet: the source is empty and the stage runs on the other source.
    res = runner.invoke(cli_app, ["data", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "no serving database yet" in res.output
    assert not [r for r in _kept(tiny_project) if r.get("meta", {}).get("source") == "feedback"]

    # Users correct two answers; the next `tunegate data` exports them and trains on the edits.
    _serve_feedback(tiny_project, ["beta", "beta, from topic 7"])
    # answers of another bundle and of the base model the server also serves are not this adapter's to learn from
    _serve_feedback(tiny_project, ["gamma"], version="other", adapter="other", first=10)
    _serve_feedback(tiny_project, ["gamma"], version="base", adapter=None, first=11)
    res = runner.invoke(cli_app, ["data", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "2 SFT row(s)" in res.output
    fb = [r for r in _kept(tiny_project) if r.get("meta", {}).get("source") == "feedback"]
    answers = sorted(r["messages"][-1]["content"] for r in fb)
    assert answers == ["beta", "beta, from topic 7"]
    assert {r["meta"]["trace_id"] for r in fb} == {"chatcmpl-0", "chatcmpl-1"}
    assert all(r["meta"]["tenant"] == "acme" and r["meta"]["adapter_version"] == "tiny-v1" for r in fb)

    # Nothing new: the export writes the same bytes and the finished data stage is skipped.
    res = runner.invoke(cli_app, ["data", str(cfg)])
    assert res.exit_code == 0 and "unchanged" in res.output, res.output


def test_a_feedback_folder_linked_outside_the_project_is_refused_before_writing(tmp_path):
    from conftest import make_tiny_project

    root = make_tiny_project(tmp_path / "proj", "some-hub/model")  # the model is never loaded
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "feedback").symlink_to(outside)
    project = load_project(_with_feedback_source(root))
    # no serving database yet: the empty source file would have been written through the link
    with pytest.raises(TunegateError, match=r"^feedback/: .* outside the project folder"):
        servedb.refresh_feedback_sources(project)
    _serve_feedback(root, ["beta"])
    with pytest.raises(TunegateError, match=r"^feedback/: .* outside the project folder"):
        servedb.refresh_feedback_sources(project)
    with pytest.raises(TunegateError, match=r"^feedback/: .* outside the project folder"):
        servedb.export_to_files(project)
    assert list(outside.iterdir()) == []


def test_the_pipeline_called_from_python_reads_a_feedback_source_not_exported_yet_as_empty(tiny_project):
    from tunegate.pipeline import run_pipeline

    project = load_project(_with_feedback_source(tiny_project, "sft"))
    manifests = run_pipeline(project, until="data")
    assert (tiny_project / "feedback" / "sft.jsonl").read_bytes() == b""
    assert str(tiny_project / "feedback" / "sft.jsonl") in manifests["data"].inputs


def test_an_edit_of_an_answer_cut_short_is_still_an_sft_row(tiny_project):
    """Found by the new-user pass: an answer cut by max_tokens made its edit vanish from sft.jsonl too (the SFT
    rows were built from the preference pairs, which leave such answers out)."""
    from tunegate.core.io import read_jsonl

    eng = servedb.connect(servedb.default_url(tiny_project))
    servedb.write_trace(eng, id="chatcmpl-cut", tenant="acme", model="tiny", adapter="tiny", adapter_sha256="ab" * 32,
                        messages=MSGS, params={}, response="alp", finish_reason="length", prompt_tokens=9,
                        completion_tokens=1, latency_ms=3.0, version="tiny-v1")
    servedb.record_feedback(eng, "acme", "chatcmpl-cut", "down", "beta", None)
    written, counts = servedb.export_to_files(load_project(tiny_project / "tunegate.yaml"), versions_of="tiny")
    assert [r["messages"][-1]["content"] for r in read_jsonl(written["sft"])] == ["beta"]
    assert read_jsonl(written["preference"]) == [] and counts["rejected_by_rule"] == {"truncated_response": 2}
