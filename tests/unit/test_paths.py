"""Identifiers that become paths, and paths tunegate writes to or runs code from, stay inside the project (issue 23,
kind 1: `--run-id ..` replaced the project's own data/ folder; `golden freeze --force` wrote outside the project)."""

import subprocess
import sys

import pytest

from tunegate import TunegateError
from tunegate.config import load_project
from tunegate.core.paths import check_identifier, identifier_problem, inside

MINIMAL = """
name: p
data:
  sources: [{path: data/train.jsonl}]
  golden: {path: data/golden.jsonl}
"""
BAD_IDS = ["..", ".", "", "../x", "a/b", "a\\b", ".hidden", "-flag", "a..b", "x" * 129, "ü", "a b", "run\n"]


def project(tmp_path, extra=""):
    (tmp_path / "data").mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    (tmp_path / "data" / "golden.jsonl").write_text('{"messages": [{"role": "user", "content": "g"}, {"role": "assistant", "content": "a"}]}\n')
    (tmp_path / "tunegate.yaml").write_text(MINIMAL + extra)
    return tmp_path / "tunegate.yaml"


@pytest.mark.parametrize("value", BAD_IDS)
def test_identifiers_that_would_escape_or_hide_are_refused(value):
    assert identifier_problem(value) is not None
    with pytest.raises(TunegateError, match=r"run id .* is not a letter or digit, then letters, digits"):
        check_identifier("run id", value)


@pytest.mark.parametrize("value", ["default", "r1", "run_2026-12-07", "A", "x" * 128])
def test_plain_identifiers_pass(value):
    assert check_identifier("run id", value) == value


@pytest.mark.parametrize("run_id", ["..", "../outside", "data/.."])
def test_a_run_id_cannot_replace_the_projects_own_folders(tmp_path, run_id):
    path = project(tmp_path)
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    r = subprocess.run([sys.executable, "-m", "tunegate.cli", "data", str(path), "--run-id", run_id], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "run id" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before  # nothing moved, written or deleted
    assert (tmp_path / "data" / "train.jsonl").is_file()


@pytest.mark.parametrize("setting", ["runs_dir: ../runs", "registry: ../tunegate.db", "runs_dir: /tmp/elsewhere"])
def test_written_paths_outside_the_project_are_refused(tmp_path, setting):
    path = project(tmp_path / "p", setting + "\n")
    with pytest.raises(TunegateError, match=rf"{setting.split(':')[0]}: .* outside the project folder"):
        load_project(path)


def test_the_golden_lock_cannot_point_outside_the_project(tmp_path):
    path = project(tmp_path / "p")
    with pytest.raises(TunegateError, match=r"data.golden_lock: .* outside the project folder"):
        load_project(path, ["data.golden_lock=../victim.json"])


def test_a_symbolic_link_inside_the_project_that_leads_outside_is_refused(tmp_path):
    (tmp_path / "outside").mkdir()
    path = project(tmp_path / "p", "runs_dir: runs\n")
    (tmp_path / "p" / "runs").symlink_to(tmp_path / "outside")
    with pytest.raises(TunegateError, match=r"runs_dir: .* resolves to .*outside, outside the project folder"):
        load_project(path)
    assert inside(tmp_path, tmp_path / "p" / "runs", "x") == tmp_path.resolve() / "outside"


def test_a_verifier_file_outside_the_project_is_never_executed(tmp_path):
    from tunegate.verifiers import load_file_verifier

    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\ndef score(c, r, row): return 1.0\n")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "link.py").symlink_to(tmp_path / "evil.py")
    for spec in ("../evil.py:score", "link.py:score", f"{tmp_path / 'evil.py'}:score"):
        with pytest.raises(TunegateError, match=r"train.grpo.verifier: .* outside the project folder"):
            load_file_verifier(spec, tmp_path / "p")
    assert not marker.exists()
    (tmp_path / "p" / "own.py").write_text("def score(c, r, row): return 0.5\n")
    fn, resolved, _ = load_file_verifier("own.py:score", tmp_path / "p")
    assert fn("a", "b", {}) == 0.5 and resolved == (tmp_path / "p" / "own.py").resolve()


def test_tenant_and_adapter_names_follow_the_same_rule(tmp_path):
    from tunegate.config import BundleConfig
    from tunegate.serve import db
    from tunegate.serve.bundles import bundle_name

    engine = db.connect(f"sqlite:///{tmp_path / 'serve.db'}")
    with pytest.raises(TunegateError, match=r"tenant name '\.\./x' is not"):
        db.add_tenant(engine, "../x", ["a"])
    assert db.add_tenant(engine, "team-a", ["a"])
    with pytest.raises(TunegateError, match=r"adapter name 'my.bundle' is not"):
        bundle_name(BundleConfig(path=tmp_path / "my.bundle"))
    assert bundle_name(BundleConfig(path=tmp_path / "release")) == "release"
    with pytest.raises(ValueError, match=r"adapter name '\.\.' is not"):
        BundleConfig(path=tmp_path, name="..")


def test_project_names_name_folders_so_they_follow_the_rule(tmp_path):
    path = project(tmp_path)
    with pytest.raises(TunegateError, match=r"name '\.\./up' is not"):
        load_project(path, ["name=../up"])


def test_a_run_folder_that_is_a_link_leading_outside_is_refused(tmp_path):
    """Found by trying it: `ln -s /tmp/outside runs/evil; tunegate data . --run-id evil` wrote /tmp/outside/data."""
    from tunegate.pipeline import run_dir_for

    outside = tmp_path / "outside"
    outside.mkdir()
    p = load_project(project(tmp_path / "p"))
    p.runs_dir.mkdir(parents=True, exist_ok=True)
    (p.runs_dir / "evil").symlink_to(outside)
    with pytest.raises(TunegateError, match=r"runs/evil: .* outside the project folder"):
        run_dir_for(p, "evil")
    (p.runs_dir / "fine").symlink_to(p.runs_dir / "elsewhere", target_is_directory=True)  # a link inside is fine
    assert run_dir_for(p, "fine") == p.runs_dir / "fine"


def test_project_relative_reads_names_against_the_project_not_the_current_folder(tmp_path, monkeypatch):
    from tunegate.core.paths import project_relative

    root = tmp_path / "proj"
    (root / "models" / "tiny").mkdir(parents=True)
    (root / "sub").mkdir()
    monkeypatch.chdir(root / "sub")  # review finding 1: from a sub-folder a hub id became 'sub/<id>'
    assert project_relative("smollm2-135m-instruct", root) == "smollm2-135m-instruct"
    assert project_relative("HuggingFaceTB/SmolLM2-135M-Instruct", root) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert project_relative(str(root / "models" / "tiny"), root) == "models/tiny"
    assert project_relative("models/tiny", root) == "models/tiny"
    assert project_relative(str(tmp_path / "elsewhere"), root) == str(tmp_path / "elsewhere")
    (tmp_path / "real").mkdir()
    (root / "link").symlink_to(tmp_path / "real")
    assert project_relative(str(root / "link"), root) == "link"  # inside as written
    assert project_relative(None, root) == "None"


def test_a_served_bundle_recorded_with_a_project_relative_base_matches_from_any_folder(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from tunegate.serve.bundles import _same_base

    root = tmp_path / "proj"
    (root / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the server does not run from the project folder
    project = SimpleNamespace(root=root, base_model=str(root / "models" / "tiny"))
    assert _same_base("models/tiny", project)
    assert not _same_base("models/other", project)
    assert _same_base("smollm2-135m-instruct", SimpleNamespace(root=root, base_model="smollm2-135m-instruct"))
