import pytest

from tunegate import TunegateError
from tunegate.config import load_project

MINIMAL = """
name: p
data:
  sources: [{path: train.jsonl}]
  golden: {path: golden.jsonl}
"""


def write(tmp_path, text):
    p = tmp_path / "tunegate.yaml"
    p.write_text(text)
    return p


def test_minimal_project_gets_defaults_and_absolute_paths(tmp_path):
    p = load_project(write(tmp_path, MINIMAL))
    assert p.base_model == "smollm2-135m-instruct"
    assert p.data.sources[0].path == tmp_path / "train.jsonl"
    assert p.data.golden_lock == tmp_path / "golden.lock.json"
    assert p.data.overlength == "drop"


def test_unknown_key_names_its_path(tmp_path):
    text = MINIMAL.replace("golden: {path: golden.jsonl}", "golden: {path: golden.jsonl, smaple: 3}")
    with pytest.raises(TunegateError, match=r"unknown key 'data\.golden\.smaple'"):
        load_project(write(tmp_path, text))


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(TunegateError, match=r"tunegate.yaml: unknown key 'trian'"):
        load_project(write(tmp_path, MINIMAL + "trian: {}\n"))


def test_overrides_with_list_index_and_yaml_values(tmp_path):
    p = load_project(
        write(tmp_path, MINIMAL),
        ["data.sources.0.path=/abs/x.jsonl", "train.trl.learning_rate=5e-5", "eval.max_new_tokens=9"],
    )
    assert str(p.data.sources[0].path) == "/abs/x.jsonl"
    assert p.train.trl["learning_rate"] == 5e-5
    assert p.eval.max_new_tokens == 9
    assert p.eval.gate[0].metric == "exact_match" and p.eval.gate[0].min_delta_ci_low == 0.0  # the default gate


def test_override_of_unknown_key_is_refused(tmp_path):
    with pytest.raises(TunegateError, match=r"unknown key 'train\.lora_rank'"):
        load_project(write(tmp_path, MINIMAL), ["train.lora_rank=8"])


def test_override_past_end_of_list(tmp_path):
    with pytest.raises(TunegateError, match=r"data.sources is a list of 1 item\(s\); address an item by index"):
        load_project(write(tmp_path, MINIMAL), ["data.sources.3.path=x"])
    with pytest.raises(TunegateError, match=r"no item min \(address an item by index, e.g. eval.gate.0.min\)"):
        load_project(write(tmp_path, MINIMAL + "eval:\n  gate: [{metric: exact_match, min: 0.5}]\n"), ["eval.gate.min=0.9"])


def test_duplicate_section_is_an_error_not_a_silent_overwrite(tmp_path):
    with pytest.raises(TunegateError, match=r"tunegate.yaml:7: not valid YAML \(key 'train' appears twice"):
        load_project(write(tmp_path, MINIMAL + "train: {lora: {r: 8}}\ntrain: {budget_minutes: 3}\n"))


def test_bad_override_value_is_blamed_on_the_override(tmp_path):
    with pytest.raises(TunegateError, match=r"^override data.overlength: key 'data.overlength'"):
        load_project(write(tmp_path, MINIMAL), ["data.overlength=sideways"])


def test_bad_value_names_key_and_value(tmp_path):
    with pytest.raises(TunegateError, match=r"key 'data\.overlength'.*'cut'"):
        load_project(write(tmp_path, MINIMAL), ["data.overlength=cut"])


def test_yaml_syntax_error_names_line(tmp_path):
    with pytest.raises(TunegateError, match=r"tunegate.yaml:2: not valid YAML \(mapping values are not allowed"):
        load_project(write(tmp_path, "name: p\nbase_model: a: b\n"))


def test_missing_project_file(tmp_path):
    with pytest.raises(TunegateError, match="project file not found"):
        load_project(tmp_path / "nope.yaml")


def test_passthrough_is_checked_without_a_model(tmp_path):
    from tunegate.recipes.defaults import check_passthrough

    ok = load_project(write(tmp_path, MINIMAL))
    assert check_passthrough(ok) == []
    bad = load_project(write(tmp_path, MINIMAL), ["train.lora.lora_alpah=3", "train.trl.learnin_rate=1"])
    problems = check_passthrough(bad)
    assert any(p.startswith("train.lora:") and "lora_alpah" in p for p in problems)
    assert any(p.startswith("train.trl:") and "learnin_rate" in p for p in problems)


def test_scientific_notation_without_a_dot_is_a_float(tmp_path):
    p = load_project(write(tmp_path, MINIMAL + "train:\n  trl: {learning_rate: 2e-4, weight_decay: 1E-2, warmup_ratio: .1}\n"))
    assert p.train.trl == {"learning_rate": 2e-4, "weight_decay": 1e-2, "warmup_ratio": 0.1}


def test_trl_values_of_the_wrong_type_are_caught_before_training(tmp_path):
    from tunegate.recipes.defaults import check_passthrough

    bad = load_project(write(tmp_path, MINIMAL), ["train.trl.num_train_epochs=one", "train.trl.packing=maybe"])
    problems = check_passthrough(bad)
    assert any("train.trl.num_train_epochs: expected float" in p and "'one'" in p for p in problems), problems
    assert any("train.trl.packing: expected bool" in p for p in problems), problems


def test_passthrough_uses_the_methods_own_trl_config(tmp_path):
    """train.trl goes to DPOConfig for DPO: its keys are accepted there, and SFT-only keys are not."""
    from tunegate.recipes.defaults import check_passthrough, trl_kwargs

    pref = MINIMAL.replace("{path: train.jsonl}", "{path: train.jsonl, format: preference}")
    dpo = load_project(write(tmp_path, pref + "train:\n  method: dpo\n  trl: {beta: 0.2, loss_type: [sigmoid]}\n"))
    assert check_passthrough(dpo) == []
    kw = trl_kwargs(dpo, tmp_path, False)
    assert kw["beta"] == 0.2 and kw["learning_rate"] == 5e-5  # tunegate's DPO default for an adapter
    bad = load_project(write(tmp_path, pref + "train:\n  method: dpo\n  trl: {packing: true}\n"))
    assert any(p.startswith("train.trl: trl.DPOConfig refused it") and "packing" in p for p in check_passthrough(bad))


def test_grpo_batch_follows_num_generations_so_the_readme_example_validates(tmp_path):
    from tunegate.recipes.defaults import check_passthrough, trl_kwargs

    p = load_project(write(tmp_path, MINIMAL + "train:\n  method: grpo\n  grpo: {verifier: numeric}\n"
                                                "  trl: {num_generations: 8, max_completion_length: 16}\n"))
    assert check_passthrough(p) == []
    assert trl_kwargs(p, tmp_path, False)["per_device_train_batch_size"] == 8


def test_the_audit_reruns_for_what_its_probe_trains_with_not_for_the_full_runs_length(tmp_path):
    # banking77: raising train.trl.max_steps after a FAIL reran the whole 15-minute audit, whose probe sets its own
    # steps and budget; only the projection of a full run's cost read them (and now names what it assumed).
    from tunegate.pipeline import stage_config, stage_spec

    def _config_for(project, stage):
        return stage_config(project, stage_spec(stage))

    path = write(tmp_path, MINIMAL + "train:\n  trl: {max_steps: 330, learning_rate: 1.0e-3, eval_steps: 160}\n  budget_minutes: 19\n")
    audit = _config_for(load_project(path), "audit")
    assert "max_steps" not in audit["train"]["trl"] and "budget_minutes" not in audit["train"]
    for override in ("train.trl.max_steps=480", "train.trl.eval_steps=100", "train.budget_minutes=30", "train.trl.num_train_epochs=2"):
        assert _config_for(load_project(path, [override]), "audit") == audit, override
        assert _config_for(load_project(path, [override]), "train") != _config_for(load_project(path), "train"), override
    for override in ("train.trl.learning_rate=2.0e-4", "train.lora.r=8", "audit.probe.max_steps=10"):
        assert _config_for(load_project(path, [override]), "audit") != audit, override


SFT_BREAKING = [  # (override, the key path the one-line refusal names): issue 20, refuse before spend
    ("train.trl.packing=true", "train.trl.packing"),
    ("train.trl.eval_packing=true", "train.trl.eval_packing"),
    ("train.trl.padding_free=true", "train.trl.padding_free"),
    ("train.trl.assistant_only_loss=true", "train.trl.assistant_only_loss"),
    ("train.trl.max_length=64", "train.trl.max_length"),  # below data.max_length 2048: TRL would cut fitted rows
    ("train.trl.loss_type=dft", "train.trl.loss_type"),
    ("train.trl.label_smoothing_factor=0.1", "train.trl.label_smoothing_factor"),
    ("train.trl.model_init_kwargs={dtype: bfloat16}", "train.trl.model_init_kwargs"),
    ("train.lora.target_modules=[q_proj, lm_head]", "train.lora.target_modules"),
]


@pytest.mark.parametrize("override,key", SFT_BREAKING, ids=[k for _, k in SFT_BREAKING])
def test_passthrough_settings_tunegate_cannot_honour_are_refused_in_one_line(tmp_path, override, key):
    """TRL accepts these, then the run crashes after the model loaded (packing, padding_free: KeyError
    'attention_mask'; assistant_only_loss, an adapter on lm_head: ValueError) or trains something else than asked
    (TRL's truncation, a loss tunegate's replaces, kwargs for a model TRL does not load)."""
    from tunegate.recipes.defaults import check_passthrough

    problems = check_passthrough(load_project(write(tmp_path, MINIMAL), [override]))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{key}: ") and "not supported" in problems[0] and "\n" not in problems[0]


@pytest.mark.parametrize("overrides", [
    ["train.trl.max_length=2048"],  # at data.max_length: a no-op
    ["train.trl.completion_only_loss=true", "train.trl.dataset_text_field=body",
     "train.trl.dataset_kwargs={skip_prepare_dataset: true}"],  # the rows carry input_ids and labels: harmless
    ["train.trl.packing=false", "train.trl.padding_free=false", "train.trl.loss_type=nll"],
    ["train.lora.target_modules=all-linear", "train.lora.modules_to_save=[lm_head]"],
], ids=["max_length_at_data_max_length", "harmless_for_tokenized_rows", "defaults_spelled_out", "lm_head_saved_not_adapted"])
def test_passthrough_settings_that_do_no_harm_are_accepted(tmp_path, overrides):
    from tunegate.recipes.defaults import check_passthrough

    assert check_passthrough(load_project(write(tmp_path, MINIMAL), overrides)) == []


def test_packing_is_refused_for_cpt_too_and_lm_head_for_dpo(tmp_path):
    from tunegate.recipes.defaults import check_passthrough

    text = MINIMAL.replace("{path: train.jsonl}", "{path: train.jsonl, format: text}")
    cpt = load_project(write(tmp_path, text + "train:\n  method: cpt\n"), ["train.trl.packing=true", "train.trl.max_length=2048"])
    assert [p.split(":")[0] for p in check_passthrough(cpt)] == ["train.trl.packing"]
    pref = MINIMAL.replace("{path: train.jsonl}", "{path: train.jsonl, format: preference}")
    dpo = load_project(write(tmp_path, pref + "train:\n  method: dpo\n"), ["train.lora.target_modules=[q_proj, lm_head]"])
    assert [p.split(":")[0] for p in check_passthrough(dpo)] == ["train.lora.target_modules"]


def _lm_eval(tmp_path, suites: str, gate: str = "[{metric: exact_match, min: 0.0}]", extra: str = "") -> object:
    return write(tmp_path, MINIMAL + f"eval:\n  suites: {suites}\n  gate: {gate}\n{extra}")


def test_lm_eval_tasks_their_folder_inside_the_project_and_their_gate_rules(tmp_path):
    (tmp_path / "tasks").mkdir()
    p = load_project(_lm_eval(tmp_path, "{lm_eval: {tasks: [local_arith], include: tasks}}",
                              "[{metric: lm_eval.local_arith.acc, min: 0.5}]"))
    assert p.eval.suites.lm_eval.include == tmp_path / "tasks" and p.eval.suites.data_root is None
    with pytest.raises(TunegateError, match=r"gate rule\(s\) on \['lm_eval.arc_easy.acc'\], which this eval does not measure "
                                            r"\(measured: exact_match, and lm_eval.<task>.<metric> for tasks \['local_arith'\]\)"):
        load_project(_lm_eval(tmp_path, "{lm_eval: {tasks: [local_arith], include: tasks}}", "[{metric: lm_eval.arc_easy.acc, min: 0.5}]"))
    with pytest.raises(TunegateError, match=r"does not measure"):  # the task name alone is no metric
        load_project(_lm_eval(tmp_path, "{lm_eval: {tasks: [local_arith]}}", "[{metric: lm_eval.local_arith., min: 0.5}]"))
    with pytest.raises(TunegateError, match=r"eval.suites.lm_eval.include: .*/elsewhere resolves to .*outside the project folder"):
        load_project(_lm_eval(tmp_path, "{lm_eval: {tasks: [t], include: ../elsewhere}}"))
    with pytest.raises(TunegateError, match=r"eval.suites.lm_eval.include: .*/missing is not a folder"):
        load_project(_lm_eval(tmp_path, "{lm_eval: {tasks: [t], include: missing}}"))
    with pytest.raises(TunegateError, match=r"task name\(s\) \['tasks/t.yaml'\]: give lm-eval task or group names"):
        load_project(_lm_eval(tmp_path, "{lm_eval: {tasks: [tasks/t.yaml]}}"))
    with pytest.raises(TunegateError, match=r"in-process: it cannot run with eval.server"):
        load_project(_lm_eval(tmp_path, "{lm_eval: {tasks: [t]}}", extra="  server: {base_url: 'http://x/v1', base_model: b}\n"))


def test_ifeval_and_safety_need_the_data_root(tmp_path):
    with pytest.raises(TunegateError, match=r"eval.suites.data_root is needed for ifeval and safety"):
        load_project(_lm_eval(tmp_path, "{ifeval: true}"))
    assert load_project(_lm_eval(tmp_path, "{data_root: suites, ifeval: true}")).eval.suites.data_root == tmp_path / "suites"


def test_the_lm_eval_task_folder_is_a_folder_of_task_files_inside_the_project(tmp_path):
    with pytest.raises(TunegateError, match=r"eval.suites.lm_eval.include: .* holds .*/runs, which tunegate writes"):
        load_project(_lm_eval(tmp_path, "{lm_eval: {tasks: [t], include: .}}"))
    (tmp_path / "tasks").mkdir()
    outside = tmp_path.parent / f"{tmp_path.name}-outside.yaml"
    outside.write_text("task: t\n")
    (tmp_path / "tasks" / "t.yaml").symlink_to(outside)
    with pytest.raises(TunegateError, match=r"tasks/t.yaml leads to .*-outside.yaml, outside the project folder"):
        load_project(_lm_eval(tmp_path, "{lm_eval: {tasks: [t], include: tasks}}"))


def test_custom_metrics_are_new_names_written_file_colon_function_and_may_be_gated(tmp_path):
    from tunegate.config import EvalConfig

    ok = EvalConfig(metrics=["exact_match", "word_overlap"], custom_metrics={"word_overlap": "metrics.py:word_overlap"},
                    gate=[{"metric": "word_overlap", "min": 0.5}])
    assert ok.model_dump(mode="json")["custom_metrics"] == {"word_overlap": "metrics.py:word_overlap"}
    assert "custom_metrics" not in EvalConfig().model_dump(mode="json")  # runs of projects without one stay current
    for custom, message in (({"exact_match": "m.py:f"}, "a custom metric's name is a new identifier"),
                            ({"output": "m.py:f"}, "a custom metric's name is a new identifier"),
                            ({"confidence": "m.py:f"}, "a custom metric's name is a new identifier"),  # samples.jsonl
                            ({"probability": "m.py:f"}, "a custom metric's name is a new identifier"),
                            ({"ifeval_mine": "m.py:f"}, "a custom metric's name is a new identifier"),
                            ({"over_refusal_x": "m.py:f"}, "a custom metric's name is a new identifier"),
                            ({"lm_eval_x": "m.py:f"}, "a custom metric's name is a new identifier"),
                            ({"j": "m.py"}, "written 'path/to/file.py:function'"),
                            ({"j": "m.txt:f"}, "written 'path/to/file.py:function'")):
        with pytest.raises(ValueError, match=message):
            EvalConfig(metrics=["exact_match"], custom_metrics=custom)
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['word_overlapp'\]; .*custom: word_overlap"):
        EvalConfig(metrics=["word_overlapp"], custom_metrics={"word_overlap": "metrics.py:word_overlap"})
