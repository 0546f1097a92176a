import json

import pytest

from tunegate.core.io import atomic_write_text
from tunegate.core.manifest import fingerprint, hash_outputs, Manifest, read_manifest, verify_outputs, write_manifest


def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path):
    p = tmp_path / "a.json"
    atomic_write_text(p, "old")

    class Boom:
        def encode(self, *_):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_text(p, Boom())
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["a.json"]  # no temporary left behind


def test_fingerprint_changes_with_config_inputs_and_upstream():
    base = fingerprint("train", {"lr": 1}, {"a": "x"}, {"data": "h"})
    assert base == fingerprint("train", {"lr": 1}, {"a": "x"}, {"data": "h"})
    assert base != fingerprint("train", {"lr": 2}, {"a": "x"}, {"data": "h"})
    assert base != fingerprint("train", {"lr": 1}, {"a": "y"}, {"data": "h"})
    assert base != fingerprint("train", {"lr": 1}, {"a": "x"}, {"data": "h2"})


def test_manifest_roundtrip_and_output_verification(tmp_path):
    (tmp_path / "out.txt").write_text("result")
    m = Manifest(stage="s", fingerprint="f", config={}, outputs=hash_outputs(tmp_path))
    digest = write_manifest(tmp_path, m)
    assert len(digest) == 64 and json.loads((tmp_path / "manifest.json").read_text())["stage"] == "s"
    assert "manifest.json" not in m.outputs and verify_outputs(tmp_path, read_manifest(tmp_path)) == []
    (tmp_path / "out.txt").write_text("tampered")
    assert verify_outputs(tmp_path, read_manifest(tmp_path)) == ["out.txt (changed)"]
