"""The eval stage's page (report/eval.py) on a hand-written eval folder: no model, no project."""

import json

from tunegate.report.eval import MAX_DIFFS, write_eval_report

SCRIPT_PROMPT = "Is <script>alert('x')</script> & more a ticket?"


def _ci(mean, lo, hi):
    return {"mean": mean, "ci_low": lo, "ci_high": hi}


def _row(i, b, c, prompt=None):
    return {"id": f"g{i:04d}", "prompt": prompt or f"prompt number {i}", "reference": f"ref-{i}",
            "baseline_output": f"base says {i}", "candidate_output": f"cand says {i}",
            "baseline_exact_match": b, "candidate_exact_match": c, "baseline_json_valid": 1.0, "candidate_json_valid": 1.0}


def _eval_dir(tmp_path, samples, verdict="FAIL", rules=None, suites=None):
    d = tmp_path / "runs" / "r1" / "eval"
    d.mkdir(parents=True)
    scores = {
        "n": len(samples), "headline": "exact_match", "baseline": "base model", "bootstrap_samples": 1000, "confidence": 0.95,
        "baseline_generation_s": 1.5, "candidate_generation_s": 2.5, "candidate_stopped_before_max_new_tokens": 0.5,
        "metrics": {
            "exact_match": {"baseline": _ci(0.25, 0.1, 0.4), "candidate": _ci(0.625, 0.5, 0.75), "delta": _ci(0.375, 0.125, 0.5)},
            "json_valid": {"baseline": _ci(1.0, 1.0, 1.0), "candidate": _ci(1.0, 1.0, 1.0), "delta": _ci(0.0, 0.0, 0.0)},
        },
    }
    rules = rules if rules is not None else [
        {"metric": "exact_match", "rule": "min", "description": "exact_match: candidate >= 0.9", "value": 0.625,
         "ci": [0.5, 0.75], "threshold": 0.9, "passed": False, "note": "gate set by the <b>team</b>"},
        {"metric": "exact_match", "rule": "min_delta_ci_low",
         "description": "exact_match: lower end of the 95% CI of (candidate - baseline) > 0.0", "value": 0.125,
         "ci": [0.125, 0.5], "threshold": 0.0, "passed": True},
    ]
    (d / "scores.json").write_text(json.dumps(scores))
    (d / "verdict.json").write_text(json.dumps({"verdict": verdict, "rules": rules}))
    (d / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    if suites is not None:
        (d / "suites.json").write_text(json.dumps(suites))
    return d


def test_eval_page_verdict_rules_escaping_and_diffs(tmp_path):
    samples = [
        _row(0, 0.0, 1.0, prompt=SCRIPT_PROMPT),  # better
        _row(1, 0.0, 1.0),  # better
        _row(2, 0.0, 1.0),  # better
        _row(3, 1.0, 0.0),  # worse
        _row(4, 1.0, 0.0),  # worse
        _row(5, 1.0, 1.0),  # same
        _row(6, 0.0, 0.0),  # same
    ]
    d = _eval_dir(tmp_path, samples)
    out = write_eval_report(d)
    assert out == d / "eval.html"
    page = out.read_text(encoding="utf-8")

    assert 'Verdict: <span class="FAIL">FAIL</span>' in page
    assert ">PASS<" in page  # the rule that held
    assert "exact_match: candidate &gt;= 0.9" in page
    assert "exact_match: lower end of the 95% CI of (candidate - baseline) &gt; 0.0" in page
    assert "gate set by the &lt;b&gt;team&lt;/b&gt;" in page  # the rule's note, escaped
    assert "[0.500, 0.750]" in page and "0.625" in page  # the failing rule's value and CI

    assert "<script>" not in page
    assert "Is &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; more a ticket?" in page

    assert "5 of 7 rows differ: candidate better on <b>3</b>,\nworse on <b>2</b>; 2 score the same" in page
    better, worse = page.split("<h3>Candidate better (3)</h3>")[1].split("<h3>Candidate worse (2)</h3>")
    assert [f"g{i:04d}" for i in (0, 1, 2)] == [f"g{i:04d}" for i in range(7) if f"<code>g{i:04d}</code>" in better]
    assert [f"g{i:04d}" for i in (3, 4)] == [f"g{i:04d}" for i in range(7) if f"<code>g{i:04d}</code>" in worse]
    assert "cand says 3" in worse and "base says 3" in worse and "ref-3" in worse

    png = d / "eval.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in page  # embedded: readable offline


def test_eval_page_caps_diffs_and_renders_suites(tmp_path):
    samples = [_row(i, 0.0, 1.0) for i in range(30)] + [_row(30 + i, 1.0, 0.0) for i in range(3)]
    suites = {"ifeval": {"n_prompts": 50, "max_new_tokens": 256, "baseline": {"summary": {"x": 1}}, "metrics": {"prompt_strict": {"baseline": _ci(0.2, 0.1, 0.3), "candidate": _ci(0.3, 0.2, 0.4),
                                                               "delta": _ci(0.1, -0.05, 0.2)}}},
              "safety": {"sources": ["a<b", "c"], "metrics": {},
                         "baseline": {"by_source": {"xstest/safe": {"n": 250, "refusal_rate": 0.04}, "jbb/harmful": {"n": 100, "refusal_rate": 0.5}}},
                         "candidate": {"by_source": {"xstest/safe": {"n": 250, "refusal_rate": 0.1}}}}}
    d = _eval_dir(tmp_path, samples, verdict="PASS", suites=suites)
    page = write_eval_report(d).read_text(encoding="utf-8")
    assert 'Verdict: <span class="PASS">PASS</span>' in page
    assert f"<h3>Candidate better (30, first {MAX_DIFFS} shown)</h3>" in page
    assert "<h3>Candidate worse (3)</h3>" in page
    better = page.split("<h3>Candidate better")[1].split("<h3>Candidate worse")[0]
    assert better.count("<code>g") == MAX_DIFFS
    assert "<h3>ifeval</h3>" in page and "n_prompts: 50 &middot; max_new_tokens: 256</p>" in page and "prompt_strict" in page
    assert "0.300 [0.200, 0.400]" in page and "+0.100 [-0.050, +0.200]" in page
    assert "<h3>safety</h3>" in page and "sources: a&lt;b, c" in page and "no metrics recorded" in page
    assert "<summary>refusal rate (string match) per source / kind</summary>" in page
    assert "<tr><td>xstest/safe</td><td>250</td><td>0.040</td><td>0.100</td></tr>" in page
    assert "<tr><td>jbb/harmful</td><td>100</td><td>0.500</td><td></td></tr>" in page


def test_eval_page_corpus_headline_and_no_rules(tmp_path):
    d = _eval_dir(tmp_path, [_row(0, 0.0, 1.0)], rules=[])
    scores = json.loads((d / "scores.json").read_text())
    scores["headline"] = "macro_f1"  # a corpus metric: no per-row scores
    scores["metrics"] = {"macro_f1": scores["metrics"]["exact_match"]}
    (d / "scores.json").write_text(json.dumps(scores))
    page = write_eval_report(d).read_text(encoding="utf-8")
    assert "macro_f1 has no per-row scores" in page
    assert "No gate rule was checked" in page


def test_a_corpus_ci_that_misses_its_point_estimate_still_plots(tmp_path):
    """A percentile bootstrap CI of macro-F1 or a ratio need not contain the point estimate (here the mean is
    under the CI): the bars are clipped at the estimate instead of matplotlib refusing a negative error."""
    d = _eval_dir(tmp_path, [_row(0, 0.0, 1.0)], rules=[])
    scores = json.loads((d / "scores.json").read_text())
    off = {"mean": 0.40, "ci_low": 0.42, "ci_high": 0.55}
    scores["metrics"] = {"label_macro_f1": {"baseline": off, "candidate": off, "delta": {"mean": -0.01, "ci_low": 0.0, "ci_high": 0.02}}}
    (d / "scores.json").write_text(json.dumps(scores))
    write_eval_report(d)
    assert (d / "eval.png").stat().st_size > 1000
