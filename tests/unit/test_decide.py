"""The decision tree: every one of the thirteen leaves is reachable, in at most five questions."""

import json
import subprocess
import sys

import pytest

from tunegate.decide import LEAVES, METHODS, TREE, DecisionError, decide, explain, paths_to_leaves


def test_every_method_is_a_reachable_leaf_within_five_questions():
    paths = paths_to_leaves()
    assert set(paths) == set(METHODS) == set(LEAVES)
    assert len(METHODS) == 13
    for method, answers in paths.items():
        d = decide(answers)
        assert d.method == method
        assert len(d.path) <= 5


@pytest.mark.parametrize("answers, method, trains", [
    ({"changing_knowledge": "yes"}, "rag", False),
    ({"changing_knowledge": "no", "prompt_meets_bar": "yes"}, "prompt_optimization", False),
    ({"changing_knowledge": "no", "prompt_meets_bar": "no", "verifier": "yes"}, "grpo", True),
    ({"changing_knowledge": "no", "prompt_meets_bar": "no", "verifier": "no", "preference": "pairs"}, "dpo", True),
    ({"changing_knowledge": "no", "prompt_meets_bar": "no", "verifier": "no", "preference": "pairs_no_sft"}, "orpo", True),
    ({"changing_knowledge": "no", "prompt_meets_bar": "no", "verifier": "no", "preference": "thumbs"}, "kto", True),
    ({"changing_knowledge": "no", "prompt_meets_bar": "no", "verifier": "no", "preference": "none", "demonstrations": "default"}, "dora", True),
    ({"changing_knowledge": "no", "prompt_meets_bar": "no", "verifier": "no", "preference": "none", "demonstrations": "unmerged_serving"}, "lora", True),
    ({"changing_knowledge": "no", "prompt_meets_bar": "no", "verifier": "no", "preference": "none", "demonstrations": "memory_tight"}, "qlora", True),
    ({"changing_knowledge": "no", "prompt_meets_bar": "no", "verifier": "no", "preference": "none", "demonstrations": "foreign_vocabulary"}, "cpt", True),
    ({"changing_knowledge": "no", "prompt_meets_bar": "no", "verifier": "no", "preference": "none", "demonstrations": "small_student"}, "distillation", True),
    ({"changing_knowledge": "no", "prompt_meets_bar": "no", "verifier": "no", "preference": "none", "demonstrations": "lora_fell_short"}, "full_sft", True),
    ({"changing_knowledge": "no", "prompt_meets_bar": "no", "verifier": "no", "preference": "none", "demonstrations": "closed_label_set"}, "classify", True),
])
def test_each_leaf(answers, method, trains):
    d = decide(answers)
    assert (d.method, d.trains) == (method, trains)
    assert d.why and d.next_step


def test_first_question_filters_knowledge_problems_regardless_of_later_answers():
    d = decide({"changing_knowledge": "yes", "verifier": "yes", "preference": "pairs"})
    assert d.method == "rag" and len(d.path) == 1
    assert any("retrieved, not trained in" in r for r in d.rejected)


def test_rejected_alternatives_are_explained():
    d = decide(paths_to_leaves()["kto"])
    assert any(r.startswith("prompt optimization") for r in d.rejected)
    assert any(r.startswith("GRPO") for r in d.rejected)
    assert any(r.startswith("DPO and ORPO") for r in d.rejected)


def test_bad_or_missing_answers_name_the_question_and_options():
    with pytest.raises(DecisionError, match=r"'changing_knowledge': answer 'maybe' is not one of yes, no"):
        decide({"changing_knowledge": "maybe"})
    with pytest.raises(DecisionError, match=r"question 'verifier' is not answered"):
        decide({"changing_knowledge": "no", "prompt_meets_bar": "no"})


def test_explain_lists_every_question_and_method():
    text = explain()
    for q in TREE.values():
        assert q.text in text
    for m in METHODS:
        assert m.upper() in text


def test_cli_decide_json_and_non_interactive_refusal(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tunegate.cli", "decide", "-a", "changing_knowledge=no", "-a", "prompt_meets_bar=no",
                        "-a", "verifier=yes", "--json", "--out", str(tmp_path / "decision.json")],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["method"] == "grpo"
    assert json.loads((tmp_path / "decision.json").read_text())["method"] == "grpo"
    r = subprocess.run([sys.executable, "-m", "tunegate.cli", "decide"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "question 'changing_knowledge' is not answered" in r.stderr


def test_the_docs_are_generated_from_the_same_table():
    from pathlib import Path

    from tunegate.decide import explain_markdown

    doc = Path(__file__).resolve().parents[2] / "docs" / "decision_tree.md"
    assert doc.read_text() == explain_markdown(), "regenerate: tunegate decide --explain --markdown > docs/decision_tree.md"
    for m in METHODS:
        assert f"**{m.upper()}**" in doc.read_text()


def test_the_wizard_asks_in_a_terminal_and_finishes_on_numbered_answers():
    """A newcomer runs `tunegate decide` with no arguments: five numbered questions, one recommendation."""
    import os
    import pty

    main, replica = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "tunegate.cli", "decide"], stdin=replica, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    os.close(replica)
    # no (knowledge), no (prompt meets bar), no (verifier), none (preference), default (demonstrations)
    os.write(main, b"2\n2\n2\n4\n1\n")
    out, err = proc.communicate(timeout=60)
    os.close(main)
    assert proc.returncode == 0, err
    assert "Recommended: DORA" in out
    assert "Rejected: GRPO: there is no programmatic reward to optimise" in out


def test_every_training_leaf_names_settings_the_project_file_accepts():
    """Each method the tree can recommend is a valid train.method / train.adapter (no leaf tunegate cannot run)."""
    from tunegate.config import TrainConfig
    from tunegate.decide import TRAIN_SETTINGS, TRAINS

    for method in METHODS:
        if not TRAINS[method]:
            continue
        settings = TRAIN_SETTINGS[method]
        extra = {"grpo": {"grpo": {"verifier": "numeric"}}, "distillation": {"distillation": {"teacher": "x"}}}.get(settings["method"], {})
        cfg = TrainConfig.model_validate({**settings, **extra})
        assert cfg.method == settings["method"]


def test_answers_given_ahead_read_from_a_file_then_flags(tmp_path):
    from tunegate.decide import read_answers

    f = tmp_path / "answers.yaml"
    f.write_text("changing_knowledge: no\nprompt_meets_bar: yes\n")  # YAML reads these as booleans
    assert read_answers(f, ["prompt_meets_bar=no"]) == {"changing_knowledge": "no", "prompt_meets_bar": "no"}
    with pytest.raises(DecisionError, match="expected question=option"):
        read_answers(None, ["changing_knowledge"])
    with pytest.raises(DecisionError, match="unknown question.*colour"):
        read_answers(None, ["colour=blue"])
    with pytest.raises(DecisionError, match="answers file not found"):
        read_answers(tmp_path / "missing.yaml")


def test_the_classify_leaf_is_written_as_train_method_classify():
    from tunegate.decide import TRAIN_SETTINGS

    d = decide(paths_to_leaves()["classify"])
    assert TRAIN_SETTINGS["classify"] == {"method": "classify"} and "closed set" in d.why
    assert any("generating the label" in r for r in d.rejected)
