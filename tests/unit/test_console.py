"""The console helpers (tunegate.core.console): the log file tee, progress bars off a terminal, nesting."""

import io
import re

import pytest
from rich.console import Console

from tunegate.core import console as con

ESC = re.compile(r"\x1b|\[A")


@pytest.fixture
def screen(monkeypatch):
    """The shared console redirected to a string buffer: what a pipe (not a terminal) would receive."""
    buf = io.StringIO()
    # `_file`, not the `file` property: undoing a set property would pin the console to this test's stderr
    # capture (the property's getter returns sys.stderr of that moment), and later tests would print into it
    monkeypatch.setattr(con.console, "_file", buf)
    return buf


@pytest.fixture
def terminal(monkeypatch):
    """The shared console as a colour terminal writing into a buffer (escape codes and live redraws included)."""
    buf = io.StringIO()
    fake = Console(file=buf, force_terminal=True, color_system="truecolor", width=100)
    for attr in ("_file", "_force_terminal", "_color_system", "_width", "is_jupyter", "is_interactive"):
        monkeypatch.setattr(con.console, attr, getattr(fake, attr))
    return buf


def test_log_to_appends_plain_text_with_a_header_per_block(tmp_path, terminal):
    log = tmp_path / "run" / "log.txt"
    with con.log_to(log, header="first invocation"):
        con.console.print("[bold red]stage 1/2 data[/bold red]: done")
        con.console.rule("[bold]stage 2/2 train", align="left")
        con.log_only("step 1/4 loss=2.5")
    with con.log_to(log, header="second invocation"):
        with con.log_to(log):  # re-entrant: no second header
            con.console.print("again")
    text = log.read_text()
    assert "\x1b[" in terminal.getvalue()  # the screen got colour codes ...
    assert not ESC.search(text)  # ... the log none
    lines = text.splitlines()
    assert lines[0] == "first invocation" and lines[1] == "stage 1/2 data: done"
    assert "stage 2/2 train" in lines[2] and "step 1/4 loss=2.5" in lines
    assert "step 1/4" not in terminal.getvalue()  # log_only: the file alone
    assert text.count("invocation") == 2 and lines[-1] == "again"


def test_an_error_leaving_the_block_is_logged(tmp_path, screen):
    log = tmp_path / "log.txt"
    with pytest.raises(ValueError):
        with con.log_to(log):
            raise ValueError("bad value in tunegate.yaml")
    assert log.read_text().splitlines()[-1] == "error: bad value in tunegate.yaml"
    assert con.console.log_console is None  # detached again


def test_a_log_that_is_a_symbolic_link_is_refused_not_followed(tmp_path, screen):
    from tunegate import TunegateError

    victim = tmp_path / "outside.txt"
    victim.write_text("theirs\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.txt").symlink_to(victim)
    with pytest.raises(TunegateError, match="a symbolic link .*never through a link"):
        with con.log_to(tmp_path / "run" / "log.txt"):
            con.console.print("stage 1/1 data")
    assert victim.read_text() == "theirs\n" and con.console.log_console is None


def test_progress_off_a_terminal_draws_nothing_live_and_says_when_done(screen, monkeypatch):
    monkeypatch.setattr(con, "DONE_LINE_S", 0.0)
    with con.progress("eval", 40) as advance:
        with con.progress("generating", 4) as inner:  # nested: joins the same display (rich allows one)
            for _ in range(4):
                inner()
        for _ in range(10):
            advance(4, info="loss 1.0")
    out = screen.getvalue()
    assert not ESC.search(out)
    assert out.splitlines() == ["generating: 4/4 in 0.0 s", "eval: 40/40 in 0.0 s"]


def test_progress_on_a_terminal_redraws_and_removes_its_bar(terminal, monkeypatch):
    monkeypatch.setattr(con, "DONE_LINE_S", 3600.0)
    bar = con.StepBar("training")
    bar.start(8, completed=2)
    bar.update(5, info="loss 2.31, 950 tok/s")
    assert con._display is not None
    con._display.refresh()  # what the 10 Hz refresh thread does
    bar.close()
    bar.close()  # twice is harmless
    assert con._display is None
    shown = terminal.getvalue()
    assert "training" in shown and "5/8" in shown and "loss 2.31, 950 tok/s" in shown and "eta" in shown


def test_fmt_seconds():
    assert [con.fmt_seconds(s) for s in (4.25, 185, 3725)] == ["4.2 s", "3 min 05 s", "1 h 02 min"]


def test_the_training_bar_keeps_the_latest_loss_eval_loss_and_throughput(tmp_path, screen):
    """recipes.common.console_progress: transformers' own printers are removed, the bar's info keeps the latest
    value of each series, and every logged dict becomes one `step N/M key=value` line in the log file."""
    from transformers import TrainerState
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from tunegate.recipes.common import console_progress

    class Trainer:  # the two methods console_progress calls
        def __init__(self):
            self.callbacks = [ProgressCallback(), PrinterCallback()]

        def remove_callback(self, kind):
            self.callbacks = [c for c in self.callbacks if not isinstance(c, kind)]

        def add_callback(self, cb):
            self.callbacks.append(cb)

    trainer = Trainer()
    cb = console_progress(trainer)
    assert trainer.callbacks == [cb]
    state = TrainerState(max_steps=4, global_step=0)
    with con.log_to(tmp_path / "log.txt", header="h"):
        cb.on_train_begin(None, state, None)
        task = con._display.tasks[0]
        for step, row in ((1, {"loss": 2.5, "tokens_per_s": 812.4}), (2, {"eval_loss": 2.25})):
            state.global_step = step
            state.log_history.append({**row, "step": step})
            cb.on_log(None, state, None, logs=row)
        assert task.completed == 2 and task.total == 4
        assert task.fields["info"] == "loss 2.5, 812 tok/s, eval_loss 2.25"
        cb.on_train_end(None, state, None)
    assert con._display is None
    assert (tmp_path / "log.txt").read_text().splitlines() == ["h", "step 1/4 loss=2.5 tokens_per_s=812.4", "step 2/4 eval_loss=2.25"]
