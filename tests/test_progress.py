"""Progress in a log: one plain line per finished trial, with the best R^2 so far and time left."""

from __future__ import annotations

import io
import os
import time

import pytest

from watcher_plugins.progress import ProgressBoard


def test_plain_lines_when_stderr_is_not_a_terminal():
    stream = io.StringIO()
    board = ProgressBoard(["nn", "xgboost"], trials=4, stream=stream)
    board.resume("nn", done=1, best=0.5)
    board.trial_done("nn", 0.4)
    board.trial_done("nn", 0.7)
    board.trial_done("nn", None)  # a failed trial counts, and leaves the best alone
    board.close()
    resumed, *lines = stream.getvalue().splitlines()
    assert resumed == "resuming study nn: 1 of 4 trials complete, 3 to run"
    assert [line.split(",")[0] for line in lines] == ["nn       2/4 trials", "nn       3/4 trials", "nn       4/4 trials"]
    assert "best R2 0.5000" in lines[0]
    assert "best R2 0.7000" in lines[1]
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
    assert "3/20 trials [00:00<?], best R2 0.5000" in str(board.bars["nn"])
    board.close()


def test_a_bar_fills_while_its_batch_trains_and_counts_failures():
    board = ProgressBoard(["nn"], trials=4, folds=2, stream=_Terminal())
    board.resume("nn", done=0, best=None)
    board.batch_started(["nn"], trials=4)
    board.batch_progress(["nn"], 0.5, folds_in_batch=8)  # half the batch: two trials' worth of work
    bar = board.bars["nn"]
    assert bar.format_dict["n"] == 2.0 and str(bar).count("#") == 10  # half of the 20-cell bar (ASCII here)
    assert "0/4 trials [" in str(bar)  # the count stays finished trials
    board.trial_done("nn", None)
    board.trial_done("nn", 0.3)
    assert "2/4 trials [" in str(bar) and "best R2 0.3000, 1 failed" in str(bar)
    board.close()


def test_time_left_fits_an_80_column_terminal():
    board = ProgressBoard(["lightgbm", "nn"], trials=20, folds=5, stream=_Terminal())
    board.resume("nn", done=0, best=None)
    board.started["nn"] -= 65.0
    board.batch_started(["nn"], trials=8)
    board.batch_progress(["nn"], 0.5, folds_in_batch=40)
    line = str(board.bars["nn"])
    assert "<04:20]" in line[:80], line  # 20 of 100 folds in 65 s: 80 more take 260 s
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
    assert "2/2 trials [00:00<00:00], best R2 0.6000" in shown["nn"], shown
    assert "2/2 trials [00:00<00:00], best R2 0.4000" in shown["xgboost"], shown


def test_time_left_comes_from_folds_and_the_batch_share_done():
    stream = io.StringIO()
    board = ProgressBoard(["nn"], trials=4, folds=3, stream=stream)
    board.resume("nn", done=0, best=None)
    assert board.seconds_left("nn") is None  # nothing done: no estimate rather than a made-up one
    board.started["nn"] -= 30.0  # 30 s in
    board.batch_started(["nn"], trials=2)
    board.batch_progress(["nn"], 0.5, folds_in_batch=6)  # half of 6 of the 12 folds: a quarter
    assert board.seconds_left("nn") == pytest.approx(90.0, rel=0.01)
    for _ in range(6):
        board.fold_done("nn")
    board.batch_done(["nn"])  # the batch's share is now its finished folds
    assert board.seconds_left("nn") == pytest.approx(30.0, rel=0.01)
    board.close()


def test_a_log_gets_a_line_every_heartbeat_while_work_goes_on():
    stream = io.StringIO()
    board = ProgressBoard(["nn"], trials=4, stream=stream, heartbeat_s=0.3)
    board.resume("nn", done=0, best=None)
    board.batch_started(["nn"], trials=4)
    time.sleep(1.5)
    board.close()
    beats = [line for line in stream.getvalue().splitlines() if line.startswith("nn ") and "0/4 trials" in line]
    assert len(beats) >= 3 and "(training a batch of 4 trials)" in beats[-1]


def test_queued_model_types_say_what_they_wait_for():
    stream = io.StringIO()
    board = ProgressBoard(["nn", "xgboost"], trials=2, stream=stream)
    board.queue("xgboost", "queued after nn")
    board.close()
    assert stream.getvalue().splitlines() == ["xgboost  queued after nn"]
    terminal = _Terminal()
    board = ProgressBoard(["nn", "xgboost"], trials=2, stream=terminal)
    board.queue("xgboost", "queued after nn")
    assert "queued after nn" in str(board.bars["xgboost"])
    board.close()


def test_a_metric_to_minimise_keeps_the_lowest_as_best():
    board = ProgressBoard(["nn"], trials=3, stream=io.StringIO(), metric="RMSE", greater_is_better=False)
    board.resume("nn", 0, None)
    for value in (0.5, 0.3, 0.4):
        board.trial_done("nn", value)
    assert board.best["nn"] == 0.3
    board.close()


def test_a_terminal_without_a_size_gets_lines_not_bars():
    leader, follower = os.openpty()  # a fresh pty reports 0 columns, as some CI runners' do
    try:
        with open(follower, "w", closefd=False) as stream:
            assert stream.isatty() and os.get_terminal_size(follower).columns == 0
            board = ProgressBoard(["nn"], trials=2, stream=stream)
            assert board.bars == {}
            board.close()
    finally:
        os.close(leader)
        os.close(follower)


def test_a_run_message_goes_above_the_bars_and_each_type_shows_its_own_batch():
    terminal, out = _Terminal(), io.StringIO()
    board = ProgressBoard(["catboost", "xgboost"], trials=8, stream=terminal)
    board.batch_started(["catboost", "xgboost"], {"catboost": 4, "xgboost": 3})
    assert "training a batch of 4 trials" in str(board.bars["catboost"])
    assert "training a batch of 3 trials" in str(board.bars["xgboost"])
    board.note("compare_models: refitting catboost's best trial (2) on all 100 rows", out)
    board.close()
    assert out.getvalue() == ""  # not beside the bars on the terminal
    assert "compare_models: refitting catboost's best trial (2)" in terminal.getvalue()
    plain = io.StringIO()
    board = ProgressBoard(["nn"], trials=2, stream=io.StringIO())
    board.note("a message", plain)
    board.close()
    assert plain.getvalue() == "a message\n"


def test_a_batchs_finished_folds_count_once_beside_its_reported_share():
    # The executor's share of its batch counts the folds already finished in it: not added twice.
    board = ProgressBoard(["nn"], trials=8, folds=3, stream=_Terminal())
    board.resume("nn", done=0, best=None)
    for _ in range(3):
        board.fold_done("nn")  # a first batch's folds, before this batch
    board.batch_started(["nn"], trials=4)
    for _ in range(6):
        board.fold_done("nn")
    board.batch_progress(["nn"], 0.5, folds_in_batch=12)  # the 6 finished folds are that half
    assert board.work_done("nn") == 9
    board.batch_progress(["nn"], 0.75, folds_in_batch=12)  # running fits' epochs on top: 9 of the 12
    assert board.work_done("nn") == 12
    assert board.bars["nn"].format_dict["n"] == 4.0  # 12 folds: four trials' worth, of 8
    board.close()


def test_a_queued_bar_shows_no_time_passing_until_its_group_starts():
    board = ProgressBoard(["nn", "xgboost"], trials=2, stream=_Terminal())
    board.resume("nn", done=0, best=None)
    board.queue("xgboost", "queued after nn")
    time.sleep(1.1)
    board.bars["xgboost"].refresh()
    assert "[00:00<?]" in str(board.bars["xgboost"]) and "queued after nn" in str(board.bars["xgboost"])
    board.resume("xgboost", done=0, best=None)
    time.sleep(1.1)
    assert "[00:01<" in str(board.bars["xgboost"]), str(board.bars["xgboost"])
    board.close()


def test_a_type_whose_folds_of_a_shared_batch_are_done_says_it_waits_for_the_others():
    board = ProgressBoard(["catboost", "lightgbm", "xgboost"], trials=4, folds=2, stream=_Terminal())
    for model_type in ("catboost", "lightgbm", "xgboost"):
        board.resume(model_type, done=0, best=None)
    board.batch_started(["catboost", "lightgbm", "xgboost"], trials=2)
    for _ in range(4):
        board.fold_done("lightgbm")
    assert board.state["lightgbm"] == "its folds done, waiting for catboost, xgboost"
    assert "waiting for catboost, xgboost" in str(board.bars["lightgbm"])
    assert board.state["catboost"] == "training a batch of 2 trials"
    for _ in range(4):
        board.fold_done("xgboost")
    assert board.state["xgboost"] == "its folds done, waiting for catboost"
    for _ in range(4):
        board.fold_done("catboost")
    assert board.state["lightgbm"] == board.state["xgboost"] == "its folds done"
    board.close()
