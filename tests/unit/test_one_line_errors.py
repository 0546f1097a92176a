"""Bad input gives one line naming the file and the rule, not a traceback (issue 23, kind 9), and the databases of
prompts, answers and promotions are created 0600."""

import stat
import subprocess
import sys

import pytest

from tunegate import TunegateError
from tunegate.config import load_project

MINIMAL = """
name: p
data:
  sources: [{path: train.jsonl}]
  golden: {path: golden.jsonl}
"""
ROW = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'


@pytest.fixture
def project(tmp_path):
    (tmp_path / "train.jsonl").write_text(ROW)
    (tmp_path / "golden.jsonl").write_text(ROW)
    (tmp_path / "tunegate.yaml").write_text(MINIMAL)
    return tmp_path / "tunegate.yaml"


def test_an_override_that_is_not_yaml_names_itself(project):
    with pytest.raises(TunegateError, match=r"override 'train.trl=\{a: \[': the value is not valid YAML"):
        load_project(project, ["train.trl={a: ["])


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_nan_or_infinity_is_never_a_gate_threshold(project, value):
    with pytest.raises(TunegateError, match=r"eval.gate.0.min.*finite number"):
        load_project(project, [f"eval.gate=[{{metric: exact_match, min: {value}}}]"])


def test_a_golden_lock_with_merge_conflict_markers_is_one_line(project):
    (project.parent / "golden.lock.json").write_text("<<<<<<< HEAD\n{}\n=======\n{}\n>>>>>>> other\n")
    r = subprocess.run([sys.executable, "-m", "tunegate.cli", "validate", str(project)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "golden.lock.json: not a golden lock" in r.stderr and "tunegate golden freeze" in r.stderr


def test_a_registry_path_that_is_not_sqlite_is_one_line(tmp_path):
    from tunegate import registry

    (tmp_path / "tunegate.db").write_text("not a database\n" * 100)
    with pytest.raises(TunegateError, match=r"tunegate.db: not a tunegate registry"):
        registry.production(tmp_path / "tunegate.db", "p")


def test_databases_are_created_readable_by_their_owner_only(tmp_path):
    from tunegate import registry
    from tunegate.serve import db

    db.connect(f"sqlite:///{tmp_path / 'serve.db'}")
    with registry.connect(tmp_path / "tunegate.db"):
        pass
    for name in ("serve.db", "tunegate.db"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
