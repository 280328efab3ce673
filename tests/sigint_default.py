"""SIGINT as the tests that send it need it, however the suite was launched.

A process started with SIGINT ignored (``nohup cmd &``, a shell's background job, some CI launchers)
hands the ignored disposition to everything it starts, across exec, and Python keeps it: a test's own
``os.kill(pid, SIGINT)``, or one sent to a child the test started, then does nothing. Tests that send
SIGINT take its default back here, and nowhere else:

- a test that signals its own process carries ``@pytest.mark.sends_sigint``: tests/conftest.py runs it
  inside ``default_sigint()`` (and tests/test_interrupts.py runs every such test from a parent that
  ignores SIGINT, to keep it so);
- a test that signals a child it starts passes ``preexec_fn=restore_default_sigint`` (Python's
  ``restore_signals`` restores SIGPIPE, SIGXFZ and SIGXFSZ only).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

#: The marker of a test that sends SIGINT to its own process.
MARKER = "sends_sigint"


def restore_default_sigint() -> None:
    """For ``subprocess``'s ``preexec_fn``: the child, and the program it execs, start with SIGINT's default
    disposition (a Python program then installs its KeyboardInterrupt handler as usual)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def ignore_sigint() -> None:
    """For ``preexec_fn``: the child starts with SIGINT ignored, as under ``nohup cmd &``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def default_sigint() -> Iterator[None]:
    """Inside the block SIGINT raises KeyboardInterrupt in this process, as in one started with SIGINT's
    default disposition; the handler before is given back when it ends."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
