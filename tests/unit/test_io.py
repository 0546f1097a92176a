"""The one folder publish (core/io.publish_dir): readers see the old folder or the new one, never half of one."""

import os

import pytest

from tunegate.core.io import publish_dir, read_jsonl, restore_set_aside


def folder(path, text):
    path.mkdir()
    (path / "f.txt").write_text(text)
    return path


def test_publish_replaces_the_old_folder_and_leaves_nothing_beside_it(tmp_path):
    final = folder(tmp_path / "out", "old")
    publish_dir(folder(tmp_path / ".out.partial", "new"), final)
    assert (final / "f.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_kill_between_the_two_renames_is_restored_whole(tmp_path):
    final = folder(tmp_path / "out", "old")
    os.replace(final, tmp_path / ".out.old-999")  # what a process killed after the first rename leaves
    assert restore_set_aside(final) == tmp_path / ".out.old-999"
    assert (final / "f.txt").read_text() == "old" and restore_set_aside(final) is None
    publish_dir(folder(tmp_path / ".out.partial", "new"), final)
    assert (final / "f.txt").read_text() == "new"


def test_a_failed_publish_puts_the_old_folder_back(tmp_path):
    final = folder(tmp_path / "out", "old")
    with pytest.raises(FileNotFoundError):
        publish_dir(tmp_path / ".missing.partial", final)
    assert (final / "f.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_read_jsonl_skips_blank_lines(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(tmp_path / "a.jsonl") == [{"a": 1}, {"a": 2}]


def test_iter_jsonl_gives_line_numbers_and_the_bad_lines_to_the_caller(tmp_path):
    from tunegate.core.io import iter_jsonl

    (tmp_path / "a.jsonl").write_text('{"a": 1}\n\n{not json\n[2]\n')
    rows = list(iter_jsonl(tmp_path / "a.jsonl"))
    assert [(n, v) for n, v, e in rows if e is None] == [(1, {"a": 1}), (4, [2])]
    assert [(n, v, type(e).__name__) for n, v, e in rows if e is not None] == [(3, "{not json", "JSONDecodeError")]
