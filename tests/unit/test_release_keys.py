"""The project-local signing key of the release stage (issue 22): made once, private 0600 and ignored by git,
never overwritten; which public key a project's bundles verify with; the release stage's fingerprint view."""

import os
import stat

import pytest
from conftest import make_tiny_project

from tunegate import TunegateError
from tunegate.config import load_project

release = pytest.importorskip("tunegate.release")
pytest.importorskip("cryptography")


@pytest.fixture
def project_dir(tmp_path):
    return make_tiny_project(tmp_path, "some-hub/model")  # never loaded here


def test_project_keys_are_made_once_0600_and_ignored_by_git(project_dir, capsys):
    project = load_project(project_dir / "tunegate.yaml")
    assert release.public_key_for(project) is None  # nothing made yet, and asking makes nothing
    assert not (project_dir / ".tunegate").exists()
    private, public = release.project_keys(project)
    assert (private, public) == (project_dir / ".tunegate/keys/private.pem", project_dir / ".tunegate/keys/public.pem")
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert "private.pem" in (private.parent / ".gitignore").read_text().splitlines()
    err = " ".join(capsys.readouterr().err.split())
    assert str(private) in err and str(public) in err
    assert release.public_pem_of(private) == public.read_bytes()
    before = private.read_bytes()
    assert release.project_keys(project) == (private, public) and private.read_bytes() == before  # reused, not remade
    assert capsys.readouterr().err == ""
    assert release.public_key_for(project) == public


def test_half_a_key_pair_is_refused_not_overwritten(project_dir):
    project = load_project(project_dir / "tunegate.yaml")
    private, public = release.project_keys(project)
    public.unlink()
    before = private.read_bytes()
    with pytest.raises(TunegateError, match=r"public.pem: missing, but its pair .*private.pem exists; rule: signing keys are never overwritten"):
        release.project_keys(project)
    assert private.read_bytes() == before and not public.exists()


def test_a_configured_key_makes_no_project_key_and_sets_the_fingerprint(project_dir, tmp_path):
    from tunegate.stages.release import config as release_view

    private, public = release.generate_keys(tmp_path / "mine")
    project = load_project(project_dir / "tunegate.yaml", [f"release.key={private}"])
    view = release_view(project)
    assert view == {"merge": True, "sigstore": False, "public_key_sha256": release.public_key_sha256(public.read_bytes())}
    assert str(private) not in str(view)  # the public part only: a moved private key reruns nothing
    assert release.signing_key(project) == private and not (project_dir / ".tunegate").exists()
    assert release_view(load_project(project_dir / "tunegate.yaml", ["release.sigstore=true"]))["public_key_sha256"] is None
    # with no key configured the view only reads: no pair yet, no sha256 (the stage's prepare makes the pair)
    assert release_view(load_project(project_dir / "tunegate.yaml"))["public_key_sha256"] is None
    assert not (project_dir / ".tunegate").exists()
    with pytest.raises(TunegateError, match=r"release.key and release.sigstore: give one of them"):
        load_project(project_dir / "tunegate.yaml", [f"release.key={private}", "release.sigstore=true"])


def test_serve_public_key_defaults_to_the_project_key(project_dir, tmp_path):
    (project_dir / "tunegate.yaml").write_text((project_dir / "tunegate.yaml").read_text() + "serve:\n  bundles: []\n")
    assert load_project(project_dir / "tunegate.yaml").serve.public_key is None  # no project key yet
    _, public = release.project_keys(load_project(project_dir / "tunegate.yaml"))
    project = load_project(project_dir / "tunegate.yaml")
    # the fallback lives in public_key_for alone: the loaded config keeps what the project file says
    assert project.serve.public_key is None and release.public_key_for(project) == public
    _, other = release.generate_keys(tmp_path / "other")
    project = load_project(project_dir / "tunegate.yaml", [f"serve.public_key={other}"])
    assert project.serve.public_key == other and release.public_key_for(project) == other  # a set key wins


def test_bundle_dir_is_inside_the_release_stage_folder(tmp_path):
    assert release.bundle_dir(tmp_path / "runs" / "r1") == tmp_path / "runs" / "r1" / "release" / "bundle"


def test_with_release_key_bundles_verify_with_its_public_part(project_dir, tmp_path):
    """Review finding 8: with release.key set and no serve.public_key, public_key_for gave None (or the unrelated
    project-local key), so promote could not verify the bundles the release stage had signed."""
    import shutil

    (project_dir / "tunegate.yaml").write_text((project_dir / "tunegate.yaml").read_text() + "serve:\n  bundles: []\n")
    release.project_keys(load_project(project_dir / "tunegate.yaml"))  # an older project-local pair exists too
    private, public = release.generate_keys(tmp_path / "mine")
    project = load_project(project_dir / "tunegate.yaml", [f"release.key={private}"])
    assert project.serve.public_key is None  # not defaulted to the project-local key: release.key signs
    assert release.public_key_for(project) == public  # its pair, beside it
    lone = tmp_path / "lone" / "signing.pem"
    lone.parent.mkdir()
    shutil.copyfile(private, lone)
    (lone.parent / "public.pem").write_bytes((project_dir / ".tunegate/keys/public.pem").read_bytes())  # not its pair
    project = load_project(project_dir / "tunegate.yaml", [f"release.key={lone}"])
    written = release.public_key_for(project)
    assert written == (project_dir / ".tunegate/keys/release-key.pub.pem").resolve()
    assert written.read_bytes() == public.read_bytes() == release.public_pem_of(lone)
    project = load_project(project_dir / "tunegate.yaml", [f"release.key={tmp_path / 'gone.pem'}"])
    with pytest.raises(TunegateError, match=r"tunegate.yaml: release.key .*gone.pem not found"):
        release.public_key_for(project)


def _finished_release(project, run_id="r1"):
    """runs/<run_id>/release/ finished by the pipeline, with the release stage's key handling and a stand-in body
    (no model): prepare, config view and fingerprint as the real stage."""
    import dataclasses

    from tunegate.core.stage import StageResult
    from tunegate.pipeline import run_stage
    from tunegate.stages.release import SPEC

    spec = dataclasses.replace(SPEC, upstream=(), run=lambda st: StageResult(metrics={"bundle": None}))
    run_dir = project.run_dir(run_id)
    return spec, run_dir, run_stage(project, run_dir, spec)


def test_the_release_stage_makes_the_key_before_its_fingerprint_so_the_second_run_is_unchanged(project_dir, capsys):
    project = load_project(project_dir / "tunegate.yaml")
    spec, run_dir, first = _finished_release(project)
    public = project_dir / ".tunegate/keys/public.pem"
    assert first.config["public_key_sha256"] == release.public_key_sha256(public.read_bytes())
    _, _, second = _finished_release(load_project(project_dir / "tunegate.yaml"))
    assert second.started_at == first.started_at and "unchanged" in capsys.readouterr().err


def test_listing_runs_makes_no_key_and_survives_a_clone_or_a_missing_key(project_dir, tmp_path):
    import shutil

    from tunegate.pipeline import stale_reason

    project = load_project(project_dir / "tunegate.yaml")
    spec, run_dir, _ = _finished_release(project)
    keys = project_dir / ".tunegate/keys"
    assert stale_reason(project, run_dir, spec) is None
    (keys / "private.pem").unlink()  # a clone: the public key is committed, the private one is not
    assert stale_reason(load_project(project_dir / "tunegate.yaml"), run_dir, spec) is None
    assert not (keys / "private.pem").exists()  # and nothing was made
    shutil.rmtree(project_dir / ".tunegate")
    assert "built from another release config" in stale_reason(load_project(project_dir / "tunegate.yaml"), run_dir, spec)
    assert not (project_dir / ".tunegate").exists()  # review finding 3: the stale check made a key pair
    from tunegate import runs

    [row] = runs.list_runs(load_project(project_dir / "tunegate.yaml"))
    assert row["run_id"] == "r1" and not (project_dir / ".tunegate").exists()
    missing = load_project(project_dir / "tunegate.yaml", [f"release.key={tmp_path / 'gone.pem'}"])
    assert "release.key" in stale_reason(missing, run_dir, spec) and "gone.pem not found" in stale_reason(missing, run_dir, spec)
