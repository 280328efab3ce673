"""Progress on stderr, per model type: trials done of total, best R^2 so far and time left.

On a terminal: one tqdm bar per model type, redrawn in place. In a log (stderr not a terminal): one
plain line per finished trial, since redrawn bars turn into escape-code noise there.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


class _Bar(tqdm):
    """A bar whose clock can stop: a model type's bar stays on screen while later groups run, and should
    keep the time it took. (Closing it early would draw it at the cursor and shift the other bars.)"""

    _stopped_at: float | None = None

    def stop_clock(self) -> None:
        self._stopped_at = self.format_dict["elapsed"]
        self.refresh()

    @property
    def format_dict(self):
        d = super().format_dict
        if self._stopped_at is not None:
            d["elapsed"] = self._stopped_at
        return d


class ProgressBoard:
    def __init__(self, model_types: list[str], trials: int, enabled: bool = True, stream: TextIO | None = None,
                 metric: str = "R2", greater_is_better: bool = True):
        self.stream = stream or sys.stderr
        self.metric = metric  # as the bars name it (ASCII: a log file or a terminal of any encoding)
        self.sign = 1.0 if greater_is_better else -1.0
        self.enabled = enabled
        self.total = trials
        self.best: dict[str, float | None] = dict.fromkeys(model_types)
        self.done: dict[str, int] = dict.fromkeys(model_types, 0)
        self.resumed: dict[str, int] = dict.fromkeys(model_types, 0)  # done by an earlier run of the study
        self.started: dict[str, float] = {}
        self.width = max((len(m) for m in model_types), default=0)
        self.bars: dict[str, tqdm] = {}
        if enabled and self.stream.isatty():
            for position, model_type in enumerate(model_types):
                self.bars[model_type] = _Bar(
                    total=trials, desc=model_type.ljust(self.width), unit="trial", position=position,
                    file=self.stream, dynamic_ncols=True, leave=True, mininterval=0.5,
                    # tqdm puts ", " before the postfix itself
                    bar_format="{desc} {bar:20} {n_fmt}/{total_fmt} trials{postfix}  [{elapsed}<{remaining}]",
                )
                self._show_bar(model_type)

    def _best_text(self, model_type: str) -> str:
        best = self.best[model_type]
        return f"best {self.metric} " + ("-" if best is None else f"{best:.4f}")

    def _show_bar(self, model_type: str) -> None:
        self.bars[model_type].set_postfix_str(self._best_text(model_type))

    def resume(self, model_type: str, done: int, best: float | None) -> None:
        """Start counting at what an earlier run of the same study already did."""
        self.best[model_type] = best
        self.done[model_type] = self.resumed[model_type] = min(done, self.total)
        self.started[model_type] = time.monotonic()
        if model_type in self.bars:
            bar = self.bars[model_type]
            bar.reset()  # the clock starts with this group, not at start-up (earlier groups ran meanwhile)
            # Resumed trials are the starting count, not progress: the rate and time left count new trials only.
            bar.initial = bar.n = bar.last_print_n = self.done[model_type]
            self._show_bar(model_type)
            if self.done[model_type] >= self.total:  # nothing left to run: no time passes for it
                bar.stop_clock()

    def trial_done(self, model_type: str, value: float | None) -> None:
        best = self.best[model_type]
        if value is not None and (best is None or self.sign * value > self.sign * best):
            self.best[model_type] = value
        self.done[model_type] += 1
        if model_type in self.bars:
            self._show_bar(model_type)
            self.bars[model_type].update(1)
            if self.done[model_type] >= self.total:
                self.bars[model_type].stop_clock()
        elif self.enabled:
            self._print_line(model_type)

    def _print_line(self, model_type: str) -> None:
        elapsed = time.monotonic() - self.started.setdefault(model_type, time.monotonic())
        ran = self.done[model_type] - self.resumed[model_type]
        left = self.total - self.done[model_type]
        eta = f", ~{elapsed / ran * left:.0f}s left" if ran and left else ""
        print(f"{model_type.ljust(self.width)}  {self.done[model_type]}/{self.total} trials, "
              f"{self._best_text(model_type)}, {elapsed:.0f}s{eta}", file=self.stream, flush=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
