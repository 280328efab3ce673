"""interrupts_held: SIGINT and SIGTERM wait for the end of the block, then reach their own handlers.

And the tests that send SIGINT pass however the suite is started, SIGINT ignored included (sigint_default.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sigint_default import MARKER, ignore_sigint

from watcher_plugins.interrupts import interrupts_held

#: Set in the child that runs the SIGINT tests with SIGINT ignored, so that it never starts another.
UNDER_IGNORED_SIGINT_ENV = "WATCHER_TEST_UNDER_IGNORED_SIGINT"
TESTS = Path(__file__).parent


@pytest.mark.sends_sigint
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


def test_a_sigint_ignored_at_start_stays_ignored():
    """Started with SIGINT ignored (``nohup watcher-agent ... &``), the agent keeps ignoring it, as a background
    job does; SIGTERM still stops it cleanly. A SIGINT inside the block is dropped, not delivered."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.skipif(os.environ.get(UNDER_IGNORED_SIGINT_ENV) == "1", reason="this is the child it starts")
def test_the_sigint_tests_pass_when_the_suite_is_started_with_sigint_ignored(tmp_path):
    """``nohup tox &`` and some CI launchers start the suite with SIGINT ignored, which every process it starts
    inherits: the tests that send SIGINT (marked sends_sigint) must take its default back themselves."""
    premise = subprocess.run(
        [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"],
        preexec_fn=ignore_sigint, capture_output=True, text=True, check=True)
    assert premise.stdout.strip() == "True", "the child was meant to start with SIGINT ignored"
    marked = {path: path.read_text(encoding="utf-8").count(f"@pytest.mark.{MARKER}")
              for path in sorted(TESTS.glob("test_*.py"))}
    marked = {path: count for path, count in marked.items() if count}
    assert {path.name for path in marked} >= {"test_interrupts.py", "test_compare_models.py"}

    # As the tox unit env selects them; this test carries no mark, so the child does not run it again.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'child'}",
         "-m", f"{MARKER} and not trees and not kernels", *map(str, marked)],
        cwd=TESTS.parent, env={**os.environ, UNDER_IGNORED_SIGINT_ENV: "1"}, preexec_fn=ignore_sigint,
        capture_output=True, text=True, timeout=600)

    output = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, output
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) >= sum(marked.values()), output
    assert not re.search(r"\d+ (failed|skipped|error)", result.stdout), output
