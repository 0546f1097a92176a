"""The one folder publish (core/io.publish_dir) and the cleanup of what a kill leaves (core/io.clean_stale).

A kill is real here: the publish runs in a child process that `TUNEGATE_FAULT` makes SIGKILL itself at a named
step (core/io.fault_point), and the next run, this process, is another PID.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from tunegate.core import io as tio
from tunegate.core.io import atomic_write_text, clean_stale, publish_dir, read_jsonl, staging_dir

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


def folder(path, text):
    path.mkdir()
    (path / "f.txt").write_text(text)
    return path


def names(path):
    return sorted(p.name for p in path.iterdir())


def killed_publish(tmp_path, point, exchange=True, stage=False):
    """In a child process: stage `new` beside tmp_path/out and publish it, SIGKILLed at `point`. Returns the
    child's exit status (-9 when the point was reached)."""
    code = f"""
        import sys
        from pathlib import Path
        from tunegate.core import io
        if not {exchange}:
            io._renameat2_fn = False  # as on a file system without RENAME_EXCHANGE
        final = Path({str(tmp_path / "out")!r})
        if {stage}:  # a pipeline stage: the fixed `.out.partial`, locked while the stage runs
            staged = final.with_name(".out.partial")
            lock = io.claim_dir(staged)
        else:
            staged = io.staging_dir(final)
        (staged / "f.txt").write_text("new")
        io.publish_dir(staged, final)
    """
    env = dict(os.environ, TUNEGATE_FAULT=point, PYTHONPATH=SRC)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True).returncode


POINTS = ["staging:created", "publish:start", "publish:exchanged", "publish:aside", "publish:renamed", "none"]


@pytest.mark.parametrize("stage", [False, True], ids=["staging_dir", "stage_partial"])
@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two_renames"])
@pytest.mark.parametrize("had_final", [True, False], ids=["replace", "first"])
@pytest.mark.parametrize("point", POINTS)
def test_a_kill_at_any_step_leaves_old_or_new_and_the_next_run_removes_every_leftover(tmp_path, point, exchange, had_final, stage):
    if had_final:
        folder(tmp_path / "out", "old")
    rc = killed_publish(tmp_path, point, exchange, stage)
    reached = rc == -9
    assert rc in (0, -9)
    absent = (point == "none" or (stage and point == "staging:created")  # steps this path does not have
              or (exchange and point == "publish:aside") or (had_final and exchange and point == "publish:renamed")
              or (not exchange and point == "publish:exchanged")
              or (not had_final and point in ("publish:exchanged", "publish:aside")))
    assert reached == (not absent)
    # Right after the kill: `out` is whole, old or new; it is missing only where it never existed, or between the
    # two renames of the fallback
    if (tmp_path / "out").exists():
        assert (tmp_path / "out" / "f.txt").read_text() in ("old", "new")
    else:
        assert not had_final or (not exchange and point == "publish:aside")
    # The next run (another process) removes every leftover and never loses the folder.
    clean_stale(tmp_path / "out")
    assert names(tmp_path) == (["out"] if had_final or not reached or point == "publish:renamed" else [])
    if names(tmp_path):
        undone = reached and point in ("staging:created", "publish:start", "publish:aside")
        assert (tmp_path / "out" / "f.txt").read_text() == ("old" if undone else "new")


def test_a_live_owners_staging_folder_is_left_alone(tmp_path):
    final = folder(tmp_path / "out", "old")
    mine = staging_dir(final)  # this process is alive
    other = tmp_path / f".out.{os.getppid()}-abcdefgh.partial"  # the parent process is alive too
    other.mkdir()
    dead = tmp_path / ".out.999999999-abcdefgh.partial"  # no such PID
    dead.mkdir()
    assert clean_stale(final) == [dead]
    assert names(tmp_path) == sorted([mine.name, other.name, "out"])


def test_a_stage_partial_is_kept_while_its_owner_holds_the_lock(tmp_path):
    final = tmp_path / "data"
    partial = tmp_path / ".data.partial"
    lock = tio.claim_dir(partial)
    try:
        assert clean_stale(final) == [] and partial.is_dir()
        with pytest.raises(BlockingIOError):
            tio.claim_dir(partial)
    finally:
        os.close(lock)
    assert clean_stale(final) == [partial] and not partial.exists()


def test_our_pid_on_a_leftover_we_did_not_make_is_a_dead_process(tmp_path):
    """In a container the same PID (often 1) comes back after a restart: a leftover with our PID that this
    process did not make is an earlier incarnation's."""
    leftover = tmp_path / f".out.{os.getpid()}-abcdefgh.partial"
    leftover.mkdir()
    assert clean_stale(tmp_path / "out") == [leftover]


def test_a_legacy_aside_is_deleted_when_the_folder_exists_and_never_restored_over_a_deleted_one(tmp_path):
    """The old scheme's `.NAME.old-PID`: after a kill between its second rename and the delete it was a stale
    copy, which the next release restored over a bundle the user had deleted meanwhile."""
    said = []
    aside = folder(tmp_path / ".out.old-999999999", "stale")
    clean_stale(tmp_path / "out", say=said.append)
    assert not (tmp_path / "out").exists() and aside.is_dir()  # never restored
    assert len(said) == 1 and "not restored" in said[0] and str(aside) in said[0]
    folder(tmp_path / "out", "new")
    clean_stale(tmp_path / "out", say=said.append)
    assert names(tmp_path) == ["out"] and (tmp_path / "out" / "f.txt").read_text() == "new" and len(said) == 1


def test_legacy_partials_and_temporary_files_without_a_pid_are_deleted(tmp_path):
    folder(tmp_path / ".out.k3j_x9ab.partial", "half")  # tempfile.mkdtemp's name before the PID
    (tmp_path / ".f.json.k3j_x9ab.tmp").write_text("{")
    (tmp_path / ".f.json.999999999-k3j_x9ab.tmp").write_text("{")
    keep = folder(tmp_path / ".out.5.k3j_x9ab.partial", "another folder's, out.5")  # not a leftover of `out`
    clean_stale(tmp_path / "out")
    atomic_write_text(tmp_path / "f.json", "{}")
    assert names(tmp_path) == sorted([keep.name, "f.json"])


def test_a_killed_atomic_write_leaves_a_temporary_file_the_next_write_removes(tmp_path):
    code = (f"import os, signal; from tunegate.core import io; os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL); "
            f"io.atomic_write_text({str(tmp_path / 'f.json')!r}, '{{}}')")
    rc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=SRC)).returncode
    assert rc == -9 and len(list(tmp_path.glob(".f.json.*.tmp"))) == 1
    atomic_write_text(tmp_path / "f.json", "{}")
    assert names(tmp_path) == ["f.json"]


def test_publish_replaces_the_old_folder_and_leaves_nothing_beside_it(tmp_path):
    final = folder(tmp_path / "out", "old")
    publish_dir(folder(tmp_path / ".out.partial", "new"), final)
    assert (final / "f.txt").read_text() == "new"
    assert names(tmp_path) == ["out"]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two_renames"])
def test_a_failed_publish_leaves_the_old_folder(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(tio, "_renameat2_fn", False)
    final = folder(tmp_path / "out", "old")
    with pytest.raises(FileNotFoundError):
        publish_dir(tmp_path / ".missing.partial", final)
    assert (final / "f.txt").read_text() == "old"
    staged = folder(tmp_path / ".out.partial", "new")
    real = os.rename

    def second_rename_fails(src, dst):
        if str(src) == str(staged):
            raise OSError("disk on fire")
        real(src, dst)

    monkeypatch.setattr(tio.os, "rename", second_rename_fails)
    if exchange:  # the exchange itself fails (found in review: this variant once repeated the two-rename one)
        def exchange_fails(a, b):
            raise OSError("disk on fire")

        monkeypatch.setattr(tio, "_exchange", exchange_fails)
    with pytest.raises(OSError, match="disk on fire"):
        publish_dir(staged, final)
    assert (final / "f.txt").read_text() == "old"
    assert names(tmp_path) == [".out.partial", "out"]


def test_publish_without_exchange_support_still_replaces(tmp_path, monkeypatch):
    monkeypatch.setattr(tio, "_renameat2_fn", False)
    final = folder(tmp_path / "out", "old")
    publish_dir(_filled(staging_dir(final), "new"), final)
    assert (final / "f.txt").read_text() == "new" and names(tmp_path) == ["out"]


def _filled(path, text):
    (path / "f.txt").write_text(text)
    return path


def test_staging_folders_get_the_mode_mkdir_gives(tmp_path):
    umask = os.umask(0o022)
    try:
        staged = staging_dir(tmp_path / "out")
    finally:
        os.umask(umask)
    assert staged.stat().st_mode & 0o777 == 0o755
    assert staged.name.startswith(f".out.{os.getpid()}-") and staged.name.endswith(".partial")


def test_read_jsonl_skips_blank_lines(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(tmp_path / "a.jsonl") == [{"a": 1}, {"a": 2}]


def test_iter_jsonl_gives_line_numbers_and_the_bad_lines_to_the_caller(tmp_path):
    from tunegate.core.io import iter_jsonl

    (tmp_path / "a.jsonl").write_text('{"a": 1}\n\n{not json\n[2]\n')
    rows = list(iter_jsonl(tmp_path / "a.jsonl"))
    assert [(n, v) for n, v, e in rows if e is None] == [(1, {"a": 1}), (4, [2])]
    assert [(n, v, type(e).__name__) for n, v, e in rows if e is not None] == [(3, "{not json", "JSONDecodeError")]


def test_remove_dir_deletes_a_folder_whole_and_its_aside_is_never_put_back(tmp_path):
    from tunegate.core.io import clean_stale, remove_dir

    final = tmp_path / "release"
    (final / "bundle").mkdir(parents=True)
    (final / "bundle" / "model.sig").write_text("x")
    assert remove_dir(final) and not final.exists() and list(tmp_path.iterdir()) == []
    assert remove_dir(final) is False  # nothing there
    aside = tmp_path / ".release.999999999-abcdef12.old"  # what a kill after the rename leaves (its PID is gone)
    (aside / "bundle").mkdir(parents=True)
    clean_stale(final, say=lambda _: None)
    assert list(tmp_path.iterdir()) == []  # deleted, not restored as `release`


def test_an_output_folder_replaces_only_an_earlier_output_of_its_kind(tmp_path):
    from tunegate import TunegateError
    from tunegate.core.io import check_replaceable

    check_replaceable(tmp_path / "new", "verdict.json", "GGUF export")  # absent: fine
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "verdict.json").write_text("{}")
    check_replaceable(earlier, "verdict.json", "GGUF export")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    with pytest.raises(TunegateError, match=r"other: exists and is not an earlier GGUF export \(no verdict.json in it\)"):
        check_replaceable(other, "verdict.json", "GGUF export")
    with pytest.raises(TunegateError, match="is not an earlier"):
        check_replaceable(other / "notes.txt", "verdict.json", "GGUF export")
    (tmp_path / "link").symlink_to(earlier)
    with pytest.raises(TunegateError, match="is not an earlier"):  # a link to an export is not one
        check_replaceable(tmp_path / "link", "verdict.json", "GGUF export")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(TunegateError, match="is not an earlier"):
        check_replaceable(tmp_path / "dangling", "verdict.json", "GGUF export")
    # a common marker name is checked for the keys an earlier output of that kind writes
    check_replaceable(earlier, "verdict.json", "GGUF export", keys=())
    with pytest.raises(TunegateError, match="is not an earlier"):  # e.g. an eval stage's verdict.json
        check_replaceable(earlier, "verdict.json", "GGUF export", keys=("types", "converter"))
    (earlier / "verdict.json").write_text('{"types": {}, "converter": "x"}')
    check_replaceable(earlier, "verdict.json", "GGUF export", keys=("types", "converter"))
