"""Promotion registry: only a PASS with a verifying signed release bundle moves to production; rollback restores
the previous production version; the registry keeps its own verified copy of each version's bundle."""

import json
import shutil
import sqlite3
from functools import partial
from pathlib import Path

import pytest

from tunegate import TunegateError, registry, release
from tunegate.core.manifest import hash_outputs, Manifest, sha256_file, write_manifest


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return release.generate_keys(tmp_path_factory.mktemp("keys"))


def fake_bundle(run, private_key, project="p"):
    """A minimal signed release bundle of the fake run, in runs/<id>/release/bundle/: the adapter, both manifests,
    the verdict, release.json, files.json and model.sig; `release.verify_bundle` checks it for real."""
    b = release.bundle_dir(run)
    (b / "adapter").mkdir(parents=True)
    shutil.copyfile(run / "train" / "adapter" / "adapter_model.safetensors", b / "adapter" / "adapter_model.safetensors")
    (b / "manifests").mkdir()
    for stage in ("train", "eval"):
        shutil.copyfile(run / stage / "manifest.json", b / "manifests" / f"{stage}.json")
    (b / "eval").mkdir()
    (b / "eval" / "verdict.json").write_text('{"verdict": "PASS"}')
    (b / "eval" / "scores.json").write_text("{}")
    digest = sha256_file(b / "adapter" / "adapter_model.safetensors")
    (b / "adapter" / "adapter_config.json").write_text("{}")
    (b / "release.json").write_text(json.dumps({"verdict": "PASS", "project": project, "run_id": run.name,
                                                "adapter_sha256": digest, "base_model": "base"}))
    files, _ = release.list_files(b)
    (b / "files.json").write_text(json.dumps({rel: sha256_file(b / rel) for rel in files}))
    release.sign_directory(b, b / "model.sig", private_key=private_key)
    return b


def fake_run(root, run_id, verdict, weights=b"w", keys=None, project="p"):
    run = root / "runs" / run_id
    (run / "train" / "adapter").mkdir(parents=True)
    (run / "train" / "adapter" / "adapter_model.safetensors").write_bytes(weights + run_id.encode())
    write_manifest(run / "train", Manifest(stage="train", fingerprint="f", config={}, outputs=hash_outputs(run / "train")))
    (run / "eval").mkdir()
    write_manifest(run / "eval", Manifest(stage="eval", fingerprint="f", config={}, verdict=verdict,
                                          metrics={"candidate": {"mean": 0.9}}))
    if keys is not None and verdict == "PASS":
        fake_bundle(run, keys[0], project)
    return run


@pytest.fixture
def promote(keys):
    """registry.promote with the run's bundle and the real verifier."""
    verify = partial(release.verify_bundle, public_key=keys[1])
    return lambda db, project, run: registry.promote(db, project, run, bundle=release.bundle_dir(run), verify=verify)


@pytest.fixture
def run(keys):
    return partial(fake_run, keys=keys)


def test_promote_only_pass_and_rollback_restores_previous(tmp_path, promote, run):
    db = tmp_path / "tunegate.db"
    r1, r2, bad = run(tmp_path, "r1", "PASS"), run(tmp_path, "r2", "PASS"), run(tmp_path, "r3", "FAIL")
    assert promote(db, "p", r1)["status"] == "production"
    with pytest.raises(TunegateError, match="verdict FAIL; rule: only a version whose eval gate passed can be promoted"):
        promote(db, "p", bad)
    assert registry.production(db, "p")["run_id"] == "r1"  # a refused promotion changes nothing
    promote(db, "p", r2)
    status = {v["run_id"]: v["status"] for v in registry.versions(db, "p")}
    assert status == {"r1": "retired", "r2": "production"}  # the refused FAIL run is not registered
    restored = registry.rollback(db, "p")
    assert restored["run_id"] == "r1"
    assert {v["run_id"]: v["status"] for v in registry.versions(db, "p")} == {"r1": "production", "r2": "retired"}
    with pytest.raises(TunegateError, match="nothing to roll back to"):
        registry.rollback(db, "p")


def test_promoting_twice_is_idempotent_and_projects_are_separate(tmp_path, promote, run):
    db = tmp_path / "tunegate.db"
    r1 = run(tmp_path, "r1", "PASS")
    a = promote(db, "p", r1)
    b = promote(db, "p", r1)
    assert a["version"] == b["version"] and len(registry.versions(db, "p")) == 1
    assert registry.production(db, "other") is None


def test_tampered_adapter_cannot_be_registered(tmp_path, promote, run):
    db = tmp_path / "tunegate.db"
    r1 = run(tmp_path, "r1", "PASS")
    (r1 / "train" / "adapter" / "adapter_model.safetensors").write_bytes(b"swapped weights")
    with pytest.raises(TunegateError, match=r"files changed since training: adapter/adapter_model.safetensors \(changed\)"):
        promote(db, "p", r1)
    assert registry.versions(db, "p") == []


def test_rollback_without_production_is_refused(tmp_path, promote, run):
    with pytest.raises(TunegateError, match="no production version"):
        registry.rollback(tmp_path / "tunegate.db", "p")


def test_a_rolled_back_version_promoted_again_can_be_rolled_back_to_later(tmp_path, promote, run):
    db = tmp_path / "tunegate.db"
    r1, r2, r3 = (run(tmp_path, r, "PASS") for r in ("r1", "r2", "r3"))
    promote(db, "p", r1)
    promote(db, "p", r2)
    registry.rollback(db, "p")          # r2 retired by rollback, r1 production
    promote(db, "p", r2)       # fixed and promoted again on purpose
    promote(db, "p", r3)
    assert registry.rollback(db, "p")["run_id"] == "r2"


def test_promoted_adapter_is_kept_when_the_run_folder_is_overwritten(tmp_path, promote, run):
    db = tmp_path / "tunegate.db"
    r1 = run(tmp_path, "r1", "PASS", weights=b"first")
    entry = promote(db, "p", r1)
    (r1 / "train" / "adapter" / "adapter_model.safetensors").write_bytes(b"a later, failed run")
    prod = registry.production(db, "p")
    assert prod["version"] == entry["version"]
    stored = tmp_path / "adapters" / f"p-v{entry['version']}" / "adapter_model.safetensors"
    assert prod["adapter_dir"] == str(stored.parent) and stored.read_bytes() == b"firstr1"
    # the bundle too: a later release in the run folder does not change the stored, verified copy
    shutil.rmtree(release.bundle_dir(r1))
    bundle = Path(prod["bundle_dir"])
    assert bundle == tmp_path / "bundles" / "p-v1" and (bundle / "adapter" / "adapter_model.safetensors").read_bytes() == b"firstr1"
    assert prod["bundle_sha256"] == sha256_file(bundle / "files.json")


def test_refused_promotion_registers_nothing_and_reading_creates_no_database(tmp_path, promote, run):
    db = tmp_path / "tunegate.db"
    assert registry.versions(db, "p") == [] and not db.exists()
    with pytest.raises(TunegateError, match="verdict FAIL"):
        promote(db, "p", run(tmp_path, "bad", "FAIL"))
    assert registry.versions(db, "p") == []


def _promote_killed_at(point, db, run, public_key):
    import os
    import subprocess
    import sys

    src = str(Path(__file__).resolve().parents[2] / "src")
    code = ("from pathlib import Path; from functools import partial; from tunegate import registry, release; "
            f"run = Path({str(run)!r}); registry.promote(Path({str(db)!r}), 'p', run, bundle=release.bundle_dir(run), "
            f"verify=partial(release.verify_bundle, public_key=Path({str(public_key)!r})))")
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TUNEGATE_FAULT=point, PYTHONPATH=src),
                          capture_output=True, text=True).returncode


# @2: the second copy, the bundle's (the adapter's is the first)
@pytest.mark.parametrize("point", ["staging:created", "publish:start", "staging:created@2", "publish:start@2",
                                   "registry:published"])
def test_a_promote_killed_at_any_step_leaves_nothing_once_promote_runs_again(tmp_path, point, promote, run, keys):
    """Killed while copying, after the copy is renamed in but before its row is committed: the row is rolled back,
    another project takes that version number meanwhile, and the rerun leaves one whole copy per row, nothing else."""
    from tunegate.core.manifest import sha256_file

    db = tmp_path / "tunegate.db"
    r1, other = run(tmp_path, "r1", "PASS"), run(tmp_path, "o1", "PASS", project="q")
    assert _promote_killed_at(point, db, r1, keys[1]) == -9
    assert registry.versions(db, "p") == []  # no row without its copy
    promote(db, "q", other)  # takes version 1, which the killed promote had used for p-v1
    entry = promote(db, "p", r1)
    assert entry["status"] == "production" and entry["version"] == 2
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["p-v2", "q-v1"]
    assert sorted(p.name for p in (tmp_path / "bundles").iterdir()) == ["p-v2", "q-v1"]
    stored = tmp_path / "adapters" / "p-v2" / "adapter_model.safetensors"
    assert sha256_file(stored) == entry["adapter_sha256"]
    assert entry["bundle_dir"] == str(tmp_path / "bundles" / "p-v2")
    assert sha256_file(tmp_path / "bundles" / "p-v2" / "adapter" / "adapter_model.safetensors") == entry["adapter_sha256"]


def test_a_half_copied_adapter_left_by_an_earlier_tunegate_is_removed(tmp_path, promote, run):
    """Before the staged copy, a kill during promote's copy left a visible `adapters/p-v1/` with no row; once the
    number went to another project nothing ever removed it."""
    db = tmp_path / "tunegate.db"
    (tmp_path / "adapters" / "p-v1").mkdir(parents=True)
    (tmp_path / "adapters" / "p-v1" / "adapter_config.json").write_text("{")  # half a copy
    promote(db, "q", run(tmp_path, "o1", "PASS", project="q"))  # version 1 goes to q
    promote(db, "p", run(tmp_path, "r1", "PASS"))
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["p-v2", "q-v1"]


def test_a_copy_whose_number_is_this_projects_or_unused_is_kept(tmp_path, promote, run):
    db = tmp_path / "tunegate.db"
    promote(db, "p", run(tmp_path, "r1", "PASS"))
    (tmp_path / "adapters" / "p-v9").mkdir()  # no row 9 yet: N's next owner replaces it, nobody deletes it
    promote(db, "q", run(tmp_path, "o1", "PASS", project="q"))
    promote(db, "p", run(tmp_path, "r2", "PASS"))
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["p-v1", "p-v3", "p-v9", "q-v2"]


# ---------------------------------------------------------------- the release bundle a promotion needs

def test_promote_without_a_bundle_is_refused_and_registers_nothing(tmp_path, promote, run):
    db = tmp_path / "tunegate.db"
    r1 = run(tmp_path, "r1", "PASS")
    shutil.rmtree(release.bundle_dir(r1))
    with pytest.raises(TunegateError, match=r"release/bundle: no signed release bundle; rule: only a released"):
        promote(db, "p", r1)
    assert registry.versions(db, "p") == [] and not (tmp_path / "bundles").exists()


def test_promote_with_a_tampered_bundle_is_refused(tmp_path, promote, run):
    db = tmp_path / "tunegate.db"
    r1 = run(tmp_path, "r1", "PASS")
    eval_scores = release.bundle_dir(r1) / "eval" / "scores.json"
    eval_scores.write_text('{"headline": "forged"}')
    with pytest.raises(TunegateError, match=r"does not verify:\n  changed: eval/scores.json"):
        promote(db, "p", r1)
    assert registry.versions(db, "p") == []


def test_promote_with_another_key_or_another_runs_bundle_is_refused(tmp_path, promote, run, keys):
    db = tmp_path / "tunegate.db"
    r1, r2 = run(tmp_path, "r1", "PASS"), run(tmp_path, "r2", "PASS")
    other_private, _ = release.generate_keys(tmp_path / "other-keys")
    shutil.rmtree(release.bundle_dir(r1))
    fake_bundle(r1, other_private)  # signed, but not with the project's key
    with pytest.raises(TunegateError, match="does not verify"):
        promote(db, "p", r1)
    shutil.rmtree(release.bundle_dir(r1))
    shutil.copytree(release.bundle_dir(r2), release.bundle_dir(r1))  # a verifying bundle of another adapter
    with pytest.raises(TunegateError, match="adapter_sha256 .* is not the one .*r1/train recorded"):
        promote(db, "p", r1)
    assert registry.versions(db, "p") == []


def test_an_old_registry_gains_the_bundle_columns_and_its_rows_their_bundle_when_promoted_again(tmp_path, promote, run, keys):
    """A registry file from before bundles were stored: the columns are added on first use, an old row reads NULL,
    rollback to it is refused (nothing to serve), and promoting its run again stores its bundle on the same row."""
    from functools import partial

    db = tmp_path / "tunegate.db"
    r1, r2 = run(tmp_path, "r1", "PASS"), run(tmp_path, "r2", "PASS")
    old_schema = registry.SCHEMA.replace("    bundle_dir TEXT,\n    bundle_sha256 TEXT,\n", "")
    assert "bundle_dir" not in old_schema
    con = sqlite3.connect(db)
    con.executescript(old_schema)
    digest = sha256_file(r1 / "train" / "adapter" / "adapter_model.safetensors")
    (tmp_path / "adapters" / "p-v1").mkdir(parents=True)
    shutil.copyfile(r1 / "train" / "adapter" / "adapter_model.safetensors", tmp_path / "adapters" / "p-v1" / "adapter_model.safetensors")
    con.execute("INSERT INTO versions (project, run_id, adapter_dir, adapter_sha256, eval_manifest_sha256, verdict, scores,"
                " status, created_at) VALUES ('p', 'r1', ?, ?, 'e', 'PASS', '{}', 'production', 'then')",
                (str(tmp_path / "adapters" / "p-v1"), digest))
    con.execute("INSERT INTO transitions (project, version, from_status, to_status, reason, at) VALUES ('p', 1, NULL, 'production', 'promoted', 'then')")
    con.commit()
    con.close()
    old = registry.production(db, "p")
    assert old["version"] == 1 and old["bundle_dir"] is None and old["bundle_sha256"] is None
    promote(db, "p", r2)
    with pytest.raises(TunegateError, match="version 1 was registered without a release bundle"):
        registry.rollback(db, "p", verify=partial(release.verify_bundle, public_key=keys[1]))
    again = promote(db, "p", r1)
    assert again["version"] == 1 and again["status"] == "production"
    assert again["bundle_dir"] == str(tmp_path / "bundles" / "p-v1")
    assert again["bundle_sha256"] == sha256_file(tmp_path / "bundles" / "p-v1" / "files.json")


def test_a_changed_stored_bundle_is_not_restored(tmp_path, promote, run):
    db = tmp_path / "tunegate.db"
    v1 = promote(db, "p", run(tmp_path, "r1", "PASS"))
    promote(db, "p", run(tmp_path, "r2", "PASS"))
    files = Path(v1["bundle_dir"]) / "files.json"
    files.write_text(files.read_text() + " ")
    with pytest.raises(TunegateError, match=r"bundles/p-v1/files.json: missing or changed since version 1 was registered"):
        registry.rollback(db, "p")
    assert registry.production(db, "p")["run_id"] == "r2"


def test_a_bundle_of_another_project_run_or_evaluation_is_refused(tmp_path, promote, run, keys):
    """Review finding 9: the adapter sha256 alone let a signed bundle of the same adapter stand for another project,
    another run folder, or an evaluation that is not the run's current one."""
    db = tmp_path / "tunegate.db"
    r1 = run(tmp_path, "r1", "PASS")
    shutil.rmtree(release.bundle_dir(r1))
    fake_bundle(r1, keys[0], project="q")  # signed with the key, same adapter, but project q's release
    with pytest.raises(TunegateError, match=r"release.json: project 'q' is not 'p'; rule: the bundle must be this project's"):
        promote(db, "p", r1)
    shutil.rmtree(release.bundle_dir(r1))
    fake_bundle(r1, keys[0])
    copy = tmp_path / "runs" / "r1-copy"
    shutil.copytree(r1, copy)  # the same adapter and eval, in another run folder: its bundle says run r1
    with pytest.raises(TunegateError, match=r"release.json: run_id 'r1' is not 'r1-copy'"):
        promote(db, "p", copy)
    write_manifest(r1 / "eval", Manifest(stage="eval", fingerprint="g", config={}, verdict="PASS",
                                         metrics={"candidate": {"mean": 0.5}}))  # evaluated again after the release
    with pytest.raises(TunegateError, match=r"manifests/eval.json: missing or not .*r1/eval/manifest.json byte for byte"):
        promote(db, "p", r1)
    assert registry.versions(db, "p") == [] and not (tmp_path / "bundles").exists()


def test_copy_folders_leading_outside_the_project_are_refused_before_anything_is_written(tmp_path, promote, run, keys):
    from functools import partial

    project_dir, outside = tmp_path / "project", tmp_path / "elsewhere"
    project_dir.mkdir()
    outside.mkdir()
    (project_dir / "bundles").symlink_to(outside)
    r1 = run(project_dir, "r1", "PASS")
    verify = partial(release.verify_bundle, public_key=keys[1])
    with pytest.raises(TunegateError, match=r"registry bundles/ folder: .*bundles resolves to .*elsewhere, outside the project"):
        registry.promote(project_dir / "tunegate.db", "p", r1, bundle=release.bundle_dir(r1), verify=verify, root=project_dir)
    assert list(outside.iterdir()) == [] and not (project_dir / "adapters").exists()
    assert registry.versions(project_dir / "tunegate.db", "p") == []


def test_rollback_refuses_copy_folders_moved_outside_the_project(tmp_path, run, keys):
    """Found by the attacker pass: `mv bundles /elsewhere; ln -s /elsewhere/bundles bundles` was refused by promote
    but not by rollback, and the server then loaded versions from outside the project."""
    import shutil
    from functools import partial

    project_dir, outside = tmp_path / "project", tmp_path / "elsewhere"
    project_dir.mkdir()
    outside.mkdir()
    db = project_dir / "tunegate.db"
    verify = partial(release.verify_bundle, public_key=keys[1])
    for rid in ("r1", "r2"):
        r = run(project_dir, rid, "PASS")
        registry.promote(db, "p", r, bundle=release.bundle_dir(r), verify=verify, root=project_dir)
    shutil.move(project_dir / "bundles", outside / "bundles")
    (project_dir / "bundles").symlink_to(outside / "bundles")
    with pytest.raises(TunegateError, match=r"registry bundles/ folder: .*outside the project"):
        registry.rollback(db, "p", verify=verify, root=project_dir)
    assert [v["status"] for v in registry.versions(db, "p")] == ["retired", "production"]
