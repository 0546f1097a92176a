"""The whole pipeline on a tiny random Llama with the real tokenizer: manifests, skip, resume, refusals."""

import json
import shutil
import subprocess
import sys

import pytest

from tunegate import TunegateError
from tunegate.config import load_project
from tunegate.core.io import read_jsonl
from tunegate.core.manifest import read_manifest
from tunegate.pipeline import run_pipeline

from conftest import chat, write_jsonl


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tunegate.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_full_run_writes_every_artifact_and_a_rerun_skips(tiny_project, capsys):
    project = load_project(tiny_project / "tunegate.yaml")
    manifests = run_pipeline(project)
    run_dir = tiny_project / "runs" / "default"
    for stage, files in {
        "data": ["train.jsonl", "val.jsonl", "golden.jsonl", "rejected.jsonl", "stats.json", "data_card.md"],
        "train": ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl", "loss.png", "train_summary.json"],
        "eval": ["samples.jsonl", "scores.json", "verdict.json"],
        "report": ["report.html", "report.md", "scores.png"],
    }.items():
        for f in files:
            assert (run_dir / stage / f).is_file(), f"{stage}/{f}"
        m = read_manifest(run_dir / stage)
        assert set(m.outputs) >= set(files) and m.wall_s > 0
    # lineage: each manifest records the sha256 of its upstream manifests
    from tunegate.core.manifest import manifest_hash

    assert manifests["train"].upstream == {"data": manifest_hash(run_dir / "data")}
    assert set(manifests["eval"].upstream) == {"data", "train"}
    # no half-written leftovers
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]

    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    assert (stats["train_rows"], stats["val_rows"], stats["golden_rows"]) == (54, 6, 12)
    summary = json.loads((run_dir / "train" / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["train_tokens_per_s"] > 0
    lora = json.loads((run_dir / "train" / "adapter" / "adapter_config.json").read_text())
    assert lora["r"] == 4 and lora["use_dora"] is True
    scores = json.loads((run_dir / "eval" / "scores.json").read_text())
    em = scores["metrics"]["exact_match"]["baseline"]
    assert scores["n"] == 12 and em["ci_low"] <= em["mean"] <= em["ci_high"]
    assert manifests["eval"].verdict == "PASS"  # thresholds in the fixture are permissive
    html = (run_dir / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html and "PASS" in html

    # the passed run can be promoted through the CLI once it has its signed bundle (made here unless the pipeline's
    # release stage made it); the registry lives next to the project file
    from tunegate.release import build_bundle, bundle_dir, generate_keys

    if not bundle_dir(run_dir).is_dir():
        keys = tiny_project / ".tunegate" / "keys"
        private = keys / "private.pem" if (keys / "private.pem").is_file() else generate_keys(keys)[0]
        build_bundle(load_project(tiny_project / "tunegate.yaml"), "default", private_key=private,
                     out_dir=bundle_dir(run_dir), merge=False)
    r = cli("promote", tiny_project / "tunegate.yaml")
    assert r.returncode == 0 and "is now production" in r.stdout, r.stderr
    from tunegate import registry

    assert registry.production(tiny_project / "tunegate.db", "tiny")["run_id"] == "default"

    capsys.readouterr()
    before = {s: read_manifest(run_dir / s).started_at for s in ("data", "train", "eval", "report")}
    run_pipeline(load_project(tiny_project / "tunegate.yaml"))
    assert "skipped" in capsys.readouterr().err
    assert {s: read_manifest(run_dir / s).started_at for s in before} == before

    # a changed eval setting reruns eval and report only
    run_pipeline(load_project(tiny_project / "tunegate.yaml", ["eval.max_new_tokens=3"]))
    after = {s: read_manifest(run_dir / s).started_at for s in before}
    assert after["data"] == before["data"] and after["train"] == before["train"]
    assert read_manifest(run_dir / "eval").config["eval"]["max_new_tokens"] == 3


def test_a_stage_refuses_upstream_stages_from_different_chains(tiny_project):
    """After `tunegate data` on changed data, `tunegate report` must not pair new data stats with an old adapter."""
    from tunegate.pipeline import run_stage

    run_pipeline(load_project(tiny_project / "tunegate.yaml"))
    with open(tiny_project / "train.jsonl", "a") as f:
        f.write(json.dumps(chat("one more row", "alpha", "extra")) + "\n")
    project = load_project(tiny_project / "tunegate.yaml")
    run_pipeline(project, until="data")
    with pytest.raises(TunegateError, match=r"stage train was built from an older data stage"):
        run_stage(project, tiny_project / "runs" / "default", "report", force=True)


def test_bad_rows_go_to_rejected_with_file_line_rule(tiny_project):
    rows = [json.loads(x) for x in (tiny_project / "train.jsonl").read_text().splitlines()]
    lines = [json.dumps(r) for r in rows] + ["{not json", json.dumps(chat("x", " "))]
    write_jsonl(tiny_project / "train.jsonl", lines)
    run_pipeline(load_project(tiny_project / "tunegate.yaml", ["data.max_rejected_fraction=0.1"]), until="data")
    rejected = [json.loads(x) for x in (tiny_project / "runs/default/data/rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["rule"]) for r in rejected] == [(61, "invalid_json"), (62, "empty_turn")]
    assert all(r["file"].endswith("train.jsonl") for r in rejected)


def test_duplicates_are_removals_not_invalid_rows(tiny_project):
    """Issue 20: 10 duplicated rows of 70 (14%) stopped the stage under max_rejected_fraction 0.05 as if they
    were broken input. Removals by the quality gates count apart, against data.max_removed_fraction."""
    rows = (tiny_project / "train.jsonl").read_text().splitlines()
    with open(tiny_project / "train.jsonl", "a") as f:
        f.write("\n".join(rows[:10]) + "\n")
    run_pipeline(load_project(tiny_project / "tunegate.yaml", ["data.dedup={one_word_variants: false}"]), until="data")
    stats = json.loads((tiny_project / "runs/default/data/stats.json").read_text())
    assert (stats["rows_invalid"], stats["rows_removed"], stats["rows_selected_out"]) == (0, 10, 0)
    assert "10 removed by the quality gates" in (tiny_project / "runs/default/data/data_card.md").read_text()
    with pytest.raises(TunegateError, match=r"10 of 70 rows removed by the quality gates .* > data.max_removed_fraction 10.0%"):
        run_pipeline(load_project(tiny_project / "tunegate.yaml", ["data.dedup={one_word_variants: false}", "data.max_removed_fraction=0.1"]),
                     until="data", force=("data",))


def test_too_many_rejections_stop_before_training_and_damage_nothing(tiny_project):
    run_pipeline(load_project(tiny_project / "tunegate.yaml"), until="data")
    good = (tiny_project / "runs/default/data/train.jsonl").read_text()
    with open(tiny_project / "train.jsonl", "a") as f:
        f.write("{broken\n" * 10)
    with pytest.raises(TunegateError, match=r"10 of 70 rows rejected .* > data.max_rejected_fraction"):
        run_pipeline(load_project(tiny_project / "tunegate.yaml"), until="data")
    assert (tiny_project / "runs/default/data/train.jsonl").read_text() == good  # earlier outputs intact


def test_golden_overlap_rows_are_removed_from_training_and_listed(tiny_project):
    golden = [json.loads(x) for x in (tiny_project / "golden.jsonl").read_text().splitlines()]
    copy = chat(golden[3]["messages"][0]["content"].upper().replace(" ", "\n  "), "alpha", "leak")
    with open(tiny_project / "train.jsonl", "a") as f:
        f.write(json.dumps(copy) + "\n")
    run_pipeline(load_project(tiny_project / "tunegate.yaml"), until="data")
    rejected = [json.loads(x) for x in (tiny_project / "runs/default/data/rejected.jsonl").read_text().splitlines()]
    assert [(r["id"], r["rule"]) for r in rejected] == [("leak", "golden_overlap")]
    assert "g3" in rejected[0]["detail"]


def test_eval_refuses_training_data_that_overlaps_the_golden_set(tiny_project):
    """C23 in docs/cases.md at the gate: even if train.jsonl is edited after the data stage, the gate will not score."""
    from tunegate.data.golden import check_golden

    project = load_project(tiny_project / "tunegate.yaml")
    run_pipeline(project, until="data")
    data_dir = tiny_project / "runs/default/data"
    golden = [json.loads(x) for x in (data_dir / "golden.jsonl").read_text().splitlines()]
    with open(data_dir / "train.jsonl", "a") as f:
        f.write(json.dumps({**golden[0], "id": "sneaky"}) + "\n")
    with pytest.raises(TunegateError, match=r"1 training row\(s\) overlap the golden set \(train~golden: sneaky~g0\)"):
        check_golden(project, data_dir)


def test_cli_exit_codes_and_one_line_errors(tiny_project):
    # unknown key: exit 2, names the key
    r = cli("validate", tiny_project / "tunegate.yaml", "train.lora_rank=8")
    assert r.returncode == 2 and "unknown key 'train.lora_rank'" in r.stderr
    # missing data file: exit 2, names the file
    r = cli("data", tiny_project / "tunegate.yaml", "data.sources.0.path=missing.jsonl")
    assert r.returncode == 2 and "missing.jsonl: input file not found" in r.stderr
    # a gate the tiny random model cannot pass: exit 3, and the report is still written
    r = cli("run", tiny_project / "tunegate.yaml", "eval.gate.0.min=0.99")
    assert r.returncode == 3, r.stderr[-2000:]
    assert "FAIL (eval gate); failed: exact_match: candidate >= 0.99" in r.stderr
    assert (tiny_project / "runs/default/report/report.html").is_file()
    verdict = json.loads((tiny_project / "runs/default/eval/verdict.json").read_text())
    assert verdict["verdict"] == "FAIL" and not verdict["rules"][0]["passed"]
    # the golden set edited after freezing: exit 2 naming the row, nothing already written is touched
    before = (tiny_project / "runs/default/train/adapter/adapter_model.safetensors").read_bytes()
    rows = (tiny_project / "golden.jsonl").read_text().splitlines()
    rows[4] = rows[4].replace('"beta"', '"gamma"')
    (tiny_project / "golden.jsonl").write_text("\n".join(rows) + "\n")
    r = cli("run", tiny_project / "tunegate.yaml")
    assert r.returncode == 2 and "golden set changed since it was frozen" in r.stderr and "1 changed: g4" in r.stderr
    assert (tiny_project / "runs/default/train/adapter/adapter_model.safetensors").read_bytes() == before


def test_killed_training_resumes_from_its_last_checkpoint(tiny_project):
    """A run interrupted after step 3 leaves checkpoint-2 and no manifest; the rerun resumes at step 2."""
    from transformers import TrainerCallback

    import tunegate.recipes.sft as sft_recipe

    project = load_project(tiny_project / "tunegate.yaml", ["train.trl.max_steps=6"])
    run_pipeline(project, until="data")

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise KeyboardInterrupt("simulated kill")

    # inject the kill through the trainer's callback list
    real_cls = sft_recipe.trainer_class

    def killing_trainer_class():
        cls = real_cls()

        class K(cls):
            def __init__(self, *a, **kw):
                kw["callbacks"] = [*kw.get("callbacks", []), Kill()]
                super().__init__(*a, **kw)

        return K

    sft_recipe.trainer_class = killing_trainer_class
    try:
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(project, until="train")
    finally:
        sft_recipe.trainer_class = real_cls
    run_dir = tiny_project / "runs/default"
    assert read_manifest(run_dir / "train") is None
    assert (run_dir / ".train.checkpoints" / "checkpoint-2").is_dir()

    manifests = run_pipeline(project, until="train")
    summary = manifests["train"].metrics
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 6
    assert not (run_dir / ".train.checkpoints").exists()  # removed once the stage succeeded

    # the same result as a run that was never interrupted (same seed, data order restored from the checkpoint)
    from safetensors.torch import load_file

    whole = run_pipeline(project, run_id="uninterrupted", until="train")["train"].metrics
    resumed_w = load_file(run_dir / "train/adapter/adapter_model.safetensors")
    whole_w = load_file(tiny_project / "runs/uninterrupted/train/adapter/adapter_model.safetensors")
    assert resumed_w.keys() == whole_w.keys()
    assert max(float((resumed_w[k] - whole_w[k]).abs().max()) for k in whole_w) < 1e-4
    assert abs(summary["final_train_loss"] - whole["final_train_loss"]) < 1e-4


def test_a_copied_project_keeps_its_finished_stages(tiny_project, tmp_path_factory, capsys):
    run_pipeline(load_project(tiny_project / "tunegate.yaml"), until="data")
    copy = tmp_path_factory.mktemp("moved") / "project"
    shutil.copytree(tiny_project, copy)
    capsys.readouterr()
    run_pipeline(load_project(copy / "tunegate.yaml"), until="data")
    assert "data: unchanged" in capsys.readouterr().err


def test_dedup_in_the_data_stage_lists_duplicates_in_rejected(tiny_project):
    with open(tiny_project / "train.jsonl", "a") as f:
        f.write(json.dumps(chat("MESSAGE number 7   about topic beta", "beta", "copy7")) + "\n")
    # the tiny project's rows are one template with one word changed: the one-word rule would take them all
    run_pipeline(load_project(tiny_project / "tunegate.yaml", ["data.dedup={one_word_variants: false}"]), until="data")
    rejected = [json.loads(x) for x in (tiny_project / "runs/default/data/rejected.jsonl").read_text().splitlines()]
    assert [(r["id"], r["rule"], r["detail"]) for r in rejected] == [("copy7", "duplicate", "exact duplicate of t7")]
    stats = json.loads((tiny_project / "runs/default/data/stats.json").read_text())
    assert stats["duplicates_removed"] == {"exact": 1, "near": 0} and stats["train_rows"] + stats["val_rows"] == 60


def test_eval_refuses_a_padded_copy_by_the_same_ngram_rule_as_the_data_stage(tiny_project):
    """C23 at the gate, n-gram kind: a re-wrapped, padded golden prompt added after the data stage is refused."""
    from tunegate.data.golden import check_golden

    project = load_project(tiny_project / "tunegate.yaml", ["data.decontaminate.ngram=3"])
    run_pipeline(project, until="data")  # the tiny training rows share no 3-word run with a golden prompt
    data_dir = tiny_project / "runs/default/data"
    check_golden(project, data_dir)
    padded = chat("Please help.\n  GOLDEN   question 3 on alpha, thanks!", "alpha", "padded")
    with open(data_dir / "train.jsonl", "a") as f:
        f.write(json.dumps(padded) + "\n")
    with pytest.raises(TunegateError, match=r"1 training row\(s\) overlap the golden set \(train~golden: padded~g3\)"):
        check_golden(project, data_dir)
    # with decontamination off only exact copies are refused
    check_golden(load_project(tiny_project / "tunegate.yaml", ["data.decontaminate=null"]), data_dir)


def test_until_audit_stops_before_training_when_the_audit_is_off(tiny_project):
    """`run --until audit` is how a multi-process training is prepared; with the audit off it must still stop."""
    manifests = run_pipeline(load_project(tiny_project / "tunegate.yaml"), until="audit")
    assert set(manifests) == {"data"}
    assert not (tiny_project / "runs/default/train").exists()


def test_a_new_stage_is_one_spec(tiny_project):
    """Adding a stage is one file that declares a StageSpec (here, this test) and one entry in the stage tuple: the
    runner gives it a folder published by rename, a manifest with lineage, skipping and reruns."""
    from tunegate.core.io import atomic_write_json, read_jsonl
    from tunegate.core.manifest import manifest_hash
    from tunegate.core.stage import StageResult, StageSpec, config_sections
    from tunegate.pipeline import STAGES

    def count_rows(st):
        n = sum(len(read_jsonl(st.upstream_dir("data") / f"{split}.jsonl")) for split in ("train", "val"))
        atomic_write_json(st.dir / "count.json", {"rows": n})
        return StageResult(metrics={"rows": n})

    toy = StageSpec(name="count", run=count_rows, upstream=("data",), config=config_sections("name"))
    chain = (STAGES[0], toy)
    run_dir = tiny_project / "runs" / "default"
    first = run_pipeline(load_project(tiny_project / "tunegate.yaml"), until="count", stages=chain)["count"]
    assert first.metrics == {"rows": 60} and json.loads((run_dir / "count" / "count.json").read_text()) == {"rows": 60}
    assert first.upstream == {"data": manifest_hash(run_dir / "data")}
    rerun = run_pipeline(load_project(tiny_project / "tunegate.yaml"), until="count", stages=chain)["count"]
    assert rerun.started_at == first.started_at  # unchanged: skipped
    with open(tiny_project / "train.jsonl", "a") as f:
        f.write(json.dumps(chat("one more row about alpha", "alpha", "extra")) + "\n")
    again = run_pipeline(load_project(tiny_project / "tunegate.yaml"), until="count", stages=chain)["count"]
    assert again.metrics == {"rows": 61} and again.upstream == {"data": manifest_hash(run_dir / "data")} != first.upstream
    assert not list(run_dir.glob(".count*"))  # no partial or set-aside folder left behind


HOSTILE_LINES = [
    '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}",  # nesting past the JSON parser's recursion limit
    '{"messages": [{"role": "user", "content": "lone \\ud800 surrogate"}, {"role": "assistant", "content": "alpha"}]}',
    '{"id": ' + "9" * 5000 + ', "messages": []}',  # an integer past int()'s digit limit
    '{"messages": [{"role": "user", "content": "nul \\u0000 and bell \\u0007"}, {"role": "assistant", "content": "beta"}]}',
    '{"messages": {"role": "user"}}',
    "[1, 2, 3]",
    '"just a string"',
]


def test_hostile_rows_are_rejected_with_a_rule_and_never_stop_the_stage(tiny_project):
    """Issue 23, kind 2: one bad row never stops the run. Every input line ends kept or rejected with a rule."""
    with open(tiny_project / "train.jsonl", "a", encoding="utf-8") as f:
        f.write("\n".join(HOSTILE_LINES) + "\n")
    n_lines = sum(1 for line in (tiny_project / "train.jsonl").read_text(encoding="utf-8").splitlines() if line.strip())
    r = cli("data", tiny_project / "tunegate.yaml", "data.max_rejected_fraction=0.5")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    out = tiny_project / "runs" / "default" / "data"
    kept = sum(len(read_jsonl(out / f"{split}.jsonl")) for split in ("train", "val"))
    rejected = read_jsonl(out / "rejected.jsonl")
    assert kept + len(rejected) == n_lines
    rules = {r["line"]: r["rule"] for r in rejected}
    first = n_lines - len(HOSTILE_LINES) + 1
    assert rules[first] == "invalid_json" and rules[first + 2] == "invalid_json"
    assert rules[first + 1] == "invalid_unicode"
    assert all(rules.get(first + i) for i in range(len(HOSTILE_LINES)) if i != 3)
