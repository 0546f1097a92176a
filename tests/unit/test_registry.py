"""Promotion registry: only a PASS moves to production; rollback restores the previous production version."""

from pathlib import Path

import pytest

from tunegate import TunegateError, registry
from tunegate.core.manifest import hash_outputs, Manifest, write_manifest


def fake_run(root, run_id, verdict, weights=b"w"):
    run = root / "runs" / run_id
    (run / "train" / "adapter").mkdir(parents=True)
    (run / "train" / "adapter" / "adapter_model.safetensors").write_bytes(weights + run_id.encode())
    write_manifest(run / "train", Manifest(stage="train", fingerprint="f", config={}, outputs=hash_outputs(run / "train")))
    (run / "eval").mkdir()
    write_manifest(run / "eval", Manifest(stage="eval", fingerprint="f", config={}, verdict=verdict,
                                          metrics={"candidate": {"mean": 0.9}}))
    return run


def test_promote_only_pass_and_rollback_restores_previous(tmp_path):
    db = tmp_path / "tunegate.db"
    r1, r2, bad = fake_run(tmp_path, "r1", "PASS"), fake_run(tmp_path, "r2", "PASS"), fake_run(tmp_path, "r3", "FAIL")
    assert registry.promote(db, "p", r1)["status"] == "production"
    with pytest.raises(TunegateError, match="verdict FAIL; rule: only a version whose eval gate passed can be promoted"):
        registry.promote(db, "p", bad)
    assert registry.production(db, "p")["run_id"] == "r1"  # a refused promotion changes nothing
    registry.promote(db, "p", r2)
    status = {v["run_id"]: v["status"] for v in registry.versions(db, "p")}
    assert status == {"r1": "retired", "r2": "production"}  # the refused FAIL run is not registered
    restored = registry.rollback(db, "p")
    assert restored["run_id"] == "r1"
    assert {v["run_id"]: v["status"] for v in registry.versions(db, "p")} == {"r1": "production", "r2": "retired"}
    with pytest.raises(TunegateError, match="nothing to roll back to"):
        registry.rollback(db, "p")


def test_promoting_twice_is_idempotent_and_projects_are_separate(tmp_path):
    db = tmp_path / "tunegate.db"
    r1 = fake_run(tmp_path, "r1", "PASS")
    a = registry.promote(db, "p", r1)
    b = registry.promote(db, "p", r1)
    assert a["version"] == b["version"] and len(registry.versions(db, "p")) == 1
    assert registry.production(db, "other") is None


def test_tampered_adapter_cannot_be_registered(tmp_path):
    db = tmp_path / "tunegate.db"
    r1 = fake_run(tmp_path, "r1", "PASS")
    (r1 / "train" / "adapter" / "adapter_model.safetensors").write_bytes(b"swapped weights")
    with pytest.raises(TunegateError, match=r"files changed since training: adapter/adapter_model.safetensors \(changed\)"):
        registry.promote(db, "p", r1)
    assert registry.versions(db, "p") == []


def test_rollback_without_production_is_refused(tmp_path):
    with pytest.raises(TunegateError, match="no production version"):
        registry.rollback(tmp_path / "tunegate.db", "p")


def test_a_rolled_back_version_promoted_again_can_be_rolled_back_to_later(tmp_path):
    db = tmp_path / "tunegate.db"
    r1, r2, r3 = (fake_run(tmp_path, r, "PASS") for r in ("r1", "r2", "r3"))
    registry.promote(db, "p", r1)
    registry.promote(db, "p", r2)
    registry.rollback(db, "p")          # r2 retired by rollback, r1 production
    registry.promote(db, "p", r2)       # fixed and promoted again on purpose
    registry.promote(db, "p", r3)
    assert registry.rollback(db, "p")["run_id"] == "r2"


def test_promoted_adapter_is_kept_when_the_run_folder_is_overwritten(tmp_path):
    db = tmp_path / "tunegate.db"
    r1 = fake_run(tmp_path, "r1", "PASS", weights=b"first")
    entry = registry.promote(db, "p", r1)
    (r1 / "train" / "adapter" / "adapter_model.safetensors").write_bytes(b"a later, failed run")
    prod = registry.production(db, "p")
    assert prod["version"] == entry["version"]
    stored = tmp_path / "adapters" / f"p-v{entry['version']}" / "adapter_model.safetensors"
    assert prod["adapter_dir"] == str(stored.parent) and stored.read_bytes() == b"firstr1"


def test_refused_promotion_registers_nothing_and_reading_creates_no_database(tmp_path):
    db = tmp_path / "tunegate.db"
    assert registry.versions(db, "p") == [] and not db.exists()
    with pytest.raises(TunegateError, match="verdict FAIL"):
        registry.promote(db, "p", fake_run(tmp_path, "bad", "FAIL"))
    assert registry.versions(db, "p") == []


def _promote_killed_at(point, db, run):
    import os
    import subprocess
    import sys

    src = str(Path(__file__).resolve().parents[2] / "src")
    code = f"from pathlib import Path; from tunegate import registry; registry.promote(Path({str(db)!r}), 'p', Path({str(run)!r}))"
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TUNEGATE_FAULT=point, PYTHONPATH=src),
                          capture_output=True, text=True).returncode


@pytest.mark.parametrize("point", ["staging:created", "publish:start", "registry:published"])
def test_a_promote_killed_at_any_step_leaves_nothing_once_promote_runs_again(tmp_path, point):
    """Killed while copying, after the copy is renamed in but before its row is committed: the row is rolled back,
    another project takes that version number meanwhile, and the rerun leaves one whole copy per row, nothing else."""
    from tunegate.core.manifest import sha256_file

    db = tmp_path / "tunegate.db"
    r1, other = fake_run(tmp_path, "r1", "PASS"), fake_run(tmp_path, "o1", "PASS")
    assert _promote_killed_at(point, db, r1) == -9
    assert registry.versions(db, "p") == []  # no row without its copy
    registry.promote(db, "q", other)  # takes version 1, which the killed promote had used for p-v1
    entry = registry.promote(db, "p", r1)
    assert entry["status"] == "production" and entry["version"] == 2
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["p-v2", "q-v1"]
    stored = tmp_path / "adapters" / "p-v2" / "adapter_model.safetensors"
    assert sha256_file(stored) == entry["adapter_sha256"]


def test_a_half_copied_adapter_left_by_an_earlier_tunegate_is_removed(tmp_path):
    """Before the staged copy, a kill during promote's copy left a visible `adapters/p-v1/` with no row; once the
    number went to another project nothing ever removed it."""
    db = tmp_path / "tunegate.db"
    (tmp_path / "adapters" / "p-v1").mkdir(parents=True)
    (tmp_path / "adapters" / "p-v1" / "adapter_config.json").write_text("{")  # half a copy
    registry.promote(db, "q", fake_run(tmp_path, "o1", "PASS"))  # version 1 goes to q
    registry.promote(db, "p", fake_run(tmp_path, "r1", "PASS"))
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["p-v2", "q-v1"]


def test_a_copy_whose_number_is_this_projects_or_unused_is_kept(tmp_path):
    db = tmp_path / "tunegate.db"
    registry.promote(db, "p", fake_run(tmp_path, "r1", "PASS"))
    (tmp_path / "adapters" / "p-v9").mkdir()  # no row 9 yet: N's next owner replaces it, nobody deletes it
    registry.promote(db, "q", fake_run(tmp_path, "o1", "PASS"))
    registry.promote(db, "p", fake_run(tmp_path, "r2", "PASS"))
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["p-v1", "p-v3", "p-v9", "q-v2"]
