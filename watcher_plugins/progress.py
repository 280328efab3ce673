"""Progress on stderr: one bar per model type with trials done, best R^2 so far and time left."""

from __future__ import annotations

import sys

from tqdm import tqdm


class ProgressBoard:
    """tqdm bars per model type. On a terminal they redraw in place; in a log they print a line each update."""

    def __init__(self, model_types: list[str], trials: int, enabled: bool = True):
        self.enabled = enabled
        self.best: dict[str, float | None] = dict.fromkeys(model_types)
        self.bars: dict[str, tqdm] = {}
        if enabled:
            width = max((len(m) for m in model_types), default=0)
            for position, model_type in enumerate(model_types):
                self.bars[model_type] = tqdm(
                    total=trials, desc=model_type.ljust(width), unit="trial", position=position,
                    file=sys.stderr, dynamic_ncols=True, leave=True, mininterval=0.5,
                    bar_format="{desc} {bar:20} {n_fmt}/{total_fmt} trials  {postfix}  [{elapsed}<{remaining}]",
                )
                self._show(model_type)

    def _show(self, model_type: str) -> None:
        best = self.best[model_type]
        self.bars[model_type].set_postfix_str("best R2 " + ("-" if best is None else f"{best:.4f}"))

    def resume(self, model_type: str, done: int, best: float | None) -> None:
        """Start a bar at what an earlier run of the same study already did."""
        self.best[model_type] = best
        if model_type in self.bars:
            self.bars[model_type].update(min(done, self.bars[model_type].total) - self.bars[model_type].n)
            self._show(model_type)

    def trial_done(self, model_type: str, value: float | None) -> None:
        if value is not None and (self.best[model_type] is None or value > self.best[model_type]):
            self.best[model_type] = value
        if model_type in self.bars:
            self._show(model_type)
            self.bars[model_type].update(1)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
