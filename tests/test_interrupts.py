"""interrupts_held: SIGINT and SIGTERM wait for the end of the block, then reach their own handlers."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from watcher_plugins.interrupts import interrupts_held


def test_ctrl_c_inside_the_block_is_raised_when_it_ends():
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("after the signal")  # still runs: the interrupt waits
    assert steps == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_reaches_the_handler_it_was_meant_for_once():
    got = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            assert got == []
        assert got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_without_a_signal_nothing_happens_and_the_handlers_are_given_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with interrupts_held():
        pass
    assert {s: signal.getsignal(s) for s in before} == before


def test_outside_the_main_thread_it_changes_nothing():
    errors = []

    def body():
        try:
            with interrupts_held():
                pass
        except Exception as exc:  # signal.signal would raise ValueError off the main thread
            errors.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert errors == []
