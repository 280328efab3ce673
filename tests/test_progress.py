"""Progress in a log: one plain line per finished trial, with the best R^2 so far and time left."""

from __future__ import annotations

import io
import time

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


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_counts_resumed_trials_as_its_start_not_as_progress():
    board = ProgressBoard(["nn"], trials=20, stream=_Terminal())
    board.resume("nn", done=16, best=0.5)
    bar = board.bars["nn"]
    assert (bar.n, bar.initial, bar.last_print_n) == (16, 16, 16)  # tqdm's rate counts n - initial
    board.trial_done("nn", 0.6)
    assert (bar.n, bar.initial) == (17, 16)
    board.close()


def test_bar_clock_starts_when_its_group_starts():
    board = ProgressBoard(["nn", "xgboost"], trials=4, stream=_Terminal())
    time.sleep(0.01)  # the NN group runs first; the xgboost bar must not count that time
    group_started = time.time()  # tqdm's clock
    board.resume("xgboost", done=0, best=None)
    assert board.bars["xgboost"].start_t >= group_started
    board.close()


def test_bar_postfix_follows_the_trial_count():
    board = ProgressBoard(["nn"], trials=20, stream=_Terminal())
    board.resume("nn", done=3, best=0.5)
    assert "3/20 trials, best R2 0.5000  [" in str(board.bars["nn"])
    board.close()


def test_a_finished_bar_stops_its_clock():
    board = ProgressBoard(["nn", "xgboost"], trials=2, stream=_Terminal())
    board.resume("nn", done=0, best=None)
    board.resume("xgboost", done=2, best=0.4)  # already complete: nothing of it runs
    board.trial_done("nn", 0.5)
    board.trial_done("nn", 0.6)
    time.sleep(1.1)  # later groups run meanwhile; each line must still say how long its model took
    board.bars["nn"].refresh()  # as the other bars' updates and the final close redraw it
    shown = {m: str(bar) for m, bar in board.bars.items()}
    board.close()
    assert "2/2 trials, best R2 0.6000  [00:00<" in shown["nn"], shown
    assert "2/2 trials, best R2 0.4000  [00:00<" in shown["xgboost"], shown
