"""Progress on stderr, per model type: trials done of total, the best score so far, and time left.

On a terminal with a size: one tqdm bar per model type, redrawn in place. Elsewhere (a log file, a pipe,
a terminal that reports no size): plain lines, since redrawn bars turn into escape-code noise or blank
lines there; a line per finished trial, and while work goes on at least one every ``heartbeat_s``.

Time left comes from work done and work left, not from trials completed: a model type's work is its
folds to run in this run (trials left x folds), each finished fold one unit, and an executor that
reports how far its running batch has come (Executor.report_progress: the NN worker's estimate of
its batch's work done) adds that share of the batch's folds. A model type whose group has not started says so: "queued after
nn". A resumed study says what it resumes ("resuming study compare_models-nn: 12 of 20 trials complete,
8 to run").
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from typing import TextIO

from tqdm import tqdm

#: A log gets a line at least this often while a model type trains (the progress_interval_s default).
HEARTBEAT_S = 25.0


class _Bar(tqdm):
    """A bar whose clock can stop (a model type's bar stays on screen while later groups run, and should
    keep the time it took; closing it early would draw it at the cursor and shift the other bars), and
    whose time left is the board's estimate (``left``), not tqdm's trials-per-second one."""

    _stopped_at: float | None = None
    left_text: str = "?"
    #: The fill, in trials' worth of work done (finished folds and the running batch's share): it moves
    #: while a batch trains, where the count of finished trials moves a whole batch at a time.
    work_n: float | None = None

    def stop_clock(self) -> None:
        self._stopped_at = self.format_dict["elapsed"]
        self.refresh()

    def hold_clock(self) -> None:
        """Show no time passing (a bar whose group has not started); reset() starts it."""
        self._stopped_at = 0.0

    def reset(self, total=None):
        self._stopped_at = None
        super().reset(total)

    @property
    def format_dict(self):
        d = super().format_dict
        if self._stopped_at is not None:
            d["elapsed"] = self._stopped_at
        d["left"] = self.left_text
        d["trials"] = self.n  # the text counts finished trials
        if self.work_n is not None:
            d["n"] = max(self.n, min(self.total or self.n, self.work_n))
        return d


def _has_size(stream: TextIO) -> bool:
    """A terminal that reports its size (a pty with 0 columns, as some CI runners and `script` give,
    would draw bars as blank lines). A stream without a file descriptor is taken at its isatty()."""
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, io.UnsupportedOperation, ValueError):
        return True
    except OSError:
        return False


class ProgressBoard:
    def __init__(self, model_types: list[str], trials: int, enabled: bool = True, stream: TextIO | None = None,
                 metric: str = "R2", greater_is_better: bool = True, folds: int = 1,
                 heartbeat_s: float = HEARTBEAT_S):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.total = trials
        self.folds = folds
        self.metric = metric  # as the bars name it (ASCII: a log file or a terminal of any encoding)
        self.sign = 1.0 if greater_is_better else -1.0
        self.best: dict[str, float | None] = dict.fromkeys(model_types)
        self.done: dict[str, int] = dict.fromkeys(model_types, 0)
        self.failed: dict[str, int] = dict.fromkeys(model_types, 0)  # in this run
        self.resumed: dict[str, int] = dict.fromkeys(model_types, 0)  # done by an earlier run of the study
        self.started: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self.units_done: dict[str, float] = dict.fromkeys(model_types, 0.0)  # folds finished in this run
        self.partial: dict[str, float] = dict.fromkeys(model_types, 0.0)  # the running batch's share
        self.batch_from: dict[str, float] = dict.fromkeys(model_types, 0.0)  # units_done when it started
        self.batch_folds: dict[str, int] = dict.fromkeys(model_types, 0)  # the running batch's folds of each type
        self.batch_members: dict[str, list[str]] = {}  # the model types of each type's running batch
        self.state: dict[str, str] = dict.fromkeys(model_types, "")  # "queued after nn", "training ..."
        self.width = max((len(m) for m in model_types), default=0)
        self.bars: dict[str, _Bar] = {}
        self._lock = threading.Lock()
        self._last_line = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if enabled and self.stream.isatty() and _has_size(self.stream):
            for position, model_type in enumerate(model_types):
                self.bars[model_type] = _Bar(
                    total=trials, desc=model_type.ljust(self.width), unit="trial", position=position,
                    file=self.stream, dynamic_ncols=True, leave=True, mininterval=0.5,
                    # time left before the postfix, which a narrow terminal cuts; tqdm puts ", " before it
                    bar_format="{desc} {bar:20} {trials}/{total_fmt} trials [{elapsed}<{left}]{postfix}",
                )
                self._show_bar(model_type)
        if enabled:
            self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), name="progress", daemon=True)
            self._thread.start()

    # -- what the run tells the board ---------------------------------------------------------------

    def queue(self, model_type: str, reason: str) -> None:
        """A model type that waits for its group: ``reason`` says for what ("queued after nn")."""
        with self._lock:
            self.state[model_type] = reason
            if model_type in self.bars:
                if model_type not in self.started:
                    self.bars[model_type].hold_clock()
                self._show_bar(model_type)
            elif self.enabled:
                self._write(f"{model_type.ljust(self.width)}  {reason}")

    def resume(self, model_type: str, done: int, best: float | None, study: str | None = None) -> None:
        """Start the model type's group, counting from what an earlier run of the same study already did."""
        with self._lock:
            self.best[model_type] = best
            self.done[model_type] = self.resumed[model_type] = min(done, self.total)
            self.started[model_type] = time.monotonic()
            self.state[model_type] = ""
            if done and self.enabled:
                self._write(f"resuming study {study or model_type}: {min(done, self.total)} of {self.total} trials "
                            f"complete, {max(0, self.total - done)} to run")
            if model_type in self.bars:
                bar = self.bars[model_type]
                bar.reset()  # the clock starts with this group, not at start-up (earlier groups ran meanwhile)
                # Resumed trials are the starting count, not progress: the rate and time left count new trials only.
                bar.initial = bar.n = bar.last_print_n = self.done[model_type]
                self._show_bar(model_type)
                if self.done[model_type] >= self.total:  # nothing left to run: no time passes for it
                    bar.stop_clock()
            elif self.enabled and not done:
                self._write(f"{model_type.ljust(self.width)}  0/{self.total} trials, started")

    def batch_started(self, model_types: list[str], trials: int | dict[str, int]) -> None:
        """A batch went to the executor: ``trials`` trials of each model type (a count per type, or one
        count for all)."""
        counts = trials if isinstance(trials, dict) else dict.fromkeys(model_types, trials)
        with self._lock:
            for model_type in model_types:
                self.state[model_type] = f"training a batch of {counts[model_type]} trials"
                self.partial[model_type] = 0.0
                self.batch_from[model_type] = self.units_done[model_type]
                self.batch_folds[model_type] = counts[model_type] * self.folds
                self.batch_members[model_type] = list(model_types)
                if model_type in self.bars:
                    self._show_bar(model_type)
            if not self.bars and self.enabled:
                for count in sorted(set(counts.values())):
                    names = [m for m in model_types if counts[m] == count]
                    self._write(f"{', '.join(names)}: training a batch of {count} trials", plain=True)

    def note(self, text: str, out: TextIO) -> None:
        """A message of the run's (a refit, say) for ``out``; while bars are drawn it goes above them on
        their stream instead, since text written to the terminal beside them would break them."""
        with self._lock:
            if self.bars:
                self._write(text)
            else:
                print(text, file=out, flush=True)

    def batch_progress(self, model_types: list[str], fraction: float, folds_in_batch: int) -> None:
        """The executor's running batch is ``fraction`` done (0..1), of ``folds_in_batch`` folds in all."""
        with self._lock:
            share = max(0.0, min(1.0, fraction)) * folds_in_batch / max(1, len(model_types))
            for model_type in model_types:
                self.partial[model_type] = share
                if model_type in self.bars:
                    self._show_bar(model_type)

    def fold_done(self, model_type: str) -> None:
        with self._lock:
            self.units_done[model_type] += 1
            # A type whose folds of a shared batch are all done waits for the others' (its trials are
            # told when the batch ends): say so, rather than "training" beside a bar that stands still.
            members = self.batch_members.get(model_type, [])
            if self._batch_folds_done(model_type) and len(members) > 1:
                waiting_for = [m for m in members if m != model_type and not self._batch_folds_done(m)]
                if waiting_for:
                    self.state[model_type] = f"its folds done, waiting for {', '.join(waiting_for)}"
                for other in members:  # a type finishing may end another's wait
                    if other != model_type and self.state[other].startswith("its folds done") and \
                            all(self._batch_folds_done(m) for m in members if m != other):
                        self.state[other] = "its folds done"
                        if other in self.bars:
                            self._show_bar(other)
            if model_type in self.bars:
                self._show_bar(model_type)

    def _batch_folds_done(self, model_type: str) -> bool:
        return self.units_done[model_type] - self.batch_from[model_type] >= self.batch_folds[model_type] > 0

    def trial_done(self, model_type: str, value: float | None) -> None:
        """A trial finished: ``value`` its score, None where it failed."""
        with self._lock:
            if value is None:
                self.failed[model_type] += 1
            best = self.best[model_type]
            if value is not None and (best is None or self.sign * value > self.sign * best):
                self.best[model_type] = value
            self.done[model_type] += 1
            if self.done[model_type] >= self.total:
                self.finished[model_type] = time.monotonic()
                self.state[model_type] = ""
            if model_type in self.bars:
                self._show_bar(model_type)
                self.bars[model_type].update(1)
                if self.done[model_type] >= self.total:
                    self.bars[model_type].stop_clock()
            elif self.enabled:
                self._write(self._line(model_type))

    def batch_done(self, model_types: list[str]) -> None:
        with self._lock:
            for model_type in model_types:
                self.partial[model_type] = 0.0
                if self.done[model_type] < self.total:
                    self.state[model_type] = ""

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        with self._lock:
            for bar in self.bars.values():
                bar.close()
            self.bars.clear()

    # -- estimates and drawing ----------------------------------------------------------------------

    def work_done(self, model_type: str) -> float:
        """Folds' worth of work done in this run: the folds finished before the running batch, plus the
        batch's share, which counts its own finished folds (so the larger of the two, not their sum)."""
        before = self.batch_from[model_type]
        return before + max(self.units_done[model_type] - before, self.partial[model_type])

    def seconds_left(self, model_type: str) -> float | None:
        """Elapsed time over work done, times work left; None before any work is done or when all is."""
        started = self.started.get(model_type)
        work = max(0, self.total - self.resumed[model_type]) * self.folds
        done = min(work, self.work_done(model_type))
        if started is None or done <= 0 or self.done[model_type] >= self.total:
            return None
        return (time.monotonic() - started) / done * max(0.0, work - done)

    def _best_text(self, model_type: str) -> str:
        best = self.best[model_type]
        failed = self.failed[model_type]
        return f"best {self.metric} " + ("-" if best is None else f"{best:.4f}") + (f", {failed} failed" if failed else "")

    def _show_bar(self, model_type: str) -> None:
        bar = self.bars[model_type]
        bar.work_n = self.resumed[model_type] + self.work_done(model_type) / self.folds
        left = self.seconds_left(model_type)
        bar.left_text = "?" if left is None else tqdm.format_interval(left)
        if self.done[model_type] >= self.total:
            bar.left_text = "00:00"
        state = self.state[model_type]
        bar.set_postfix_str(self._best_text(model_type) + (f", {state}" if state else ""))

    def _line(self, model_type: str) -> str:
        elapsed = (self.finished.get(model_type) or time.monotonic()) - self.started.setdefault(model_type, time.monotonic())
        left = self.seconds_left(model_type)
        state = self.state[model_type]
        return (f"{model_type.ljust(self.width)}  {self.done[model_type]}/{self.total} trials, "
                f"{self._best_text(model_type)}, {elapsed:.0f}s" + (f", ~{left:.0f}s left" if left else "")
                + (f" ({state})" if state else ""))

    def _write(self, text: str, plain: bool = False) -> None:
        """A line on the stream; under bars, above them (tqdm.write keeps them whole)."""
        self._last_line = time.monotonic()
        if self.bars and not plain:
            tqdm.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _beat(self, period: float) -> None:
        """Lines mode: a line per training model type when none was written for ``period`` seconds. Bars:
        redraw them (time left moves while no trial finishes)."""
        while not self._stop.wait(min(period, 1.0)):
            with self._lock:
                if self.bars:
                    for model_type, bar in self.bars.items():
                        if model_type in self.started and self.done[model_type] < self.total:
                            self._show_bar(model_type)
                            bar.refresh()
                elif time.monotonic() - self._last_line >= period:
                    running = [m for m in self.started if self.done[m] < self.total]
                    for model_type in running:
                        self._write(self._line(model_type))
                    self._last_line = time.monotonic()
