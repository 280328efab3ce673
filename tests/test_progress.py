"""Progress in a log: one plain line per finished trial, with the best R^2 so far and time left."""

from __future__ import annotations

import io

from watcher_plugins.progress import ProgressBoard


def test_plain_lines_when_stderr_is_not_a_terminal():
    stream = io.StringIO()
    board = ProgressBoard(["nn", "xgboost"], trials=4, stream=stream)
    board.resume("nn", done=1, best=0.5)
    board.trial_done("nn", 0.4)
    board.trial_done("nn", 0.7)
    board.trial_done("nn", None)  # a failed trial counts, and leaves the best alone
    board.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["nn       2/4 trials", "nn       3/4 trials", "nn       4/4 trials"]
    assert "best R2 0.5000" in lines[0] and "left" in lines[0]
    assert "best R2 0.7000" in lines[1] and "left" in lines[1]
    assert "best R2 0.7000" in lines[2] and "left" not in lines[2]
    assert "\x1b" not in stream.getvalue()


def test_disabled_board_prints_nothing():
    stream = io.StringIO()
    board = ProgressBoard(["nn"], trials=2, enabled=False, stream=stream)
    board.resume("nn", 0, None)
    board.trial_done("nn", 0.1)
    assert stream.getvalue() == ""
