"""Hold Ctrl-C and SIGTERM for a step that must not be cut in two, then deliver them.

Asking an Optuna trial writes it to the study (RUNNING) before the call returns. A KeyboardInterrupt
between that write and the caller's bookkeeping would leave a RUNNING trial that nobody marks FAIL
(seen once in CI: the signal landed inside ``study.ask``). Inside ``interrupts_held()`` such a signal
is recorded instead, and delivered to the handler it was meant for when the block ends.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Defer SIGINT and SIGTERM until the block ends (a no-op outside the main thread, where Python
    delivers no signal anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: pending.append(signum))
                for signum in HELD_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            first = signal.Signals(pending[0])
            handler = previous[first]
            if callable(handler):
                handler(first, None)  # e.g. default_int_handler: raises KeyboardInterrupt here
            elif handler == signal.SIG_DFL:
                signal.raise_signal(first)
