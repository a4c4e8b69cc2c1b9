"""The progress display of a search: trials done, the best so far, the time left."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from optuna.trial import FrozenTrial
from rich.console import Console
from rich.progress import Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from steerlab.abliterate.objective import TrialScore
from steerlab.generation.progress import counting_bar


class SearchDisplay:
    """Keeps the best trial under the KL cap (fewest refusals) and redraws one bar."""

    def __init__(self, progress: Progress | None, total: int, done: int, kl_cap: float,
                 best: TrialScore | None = None) -> None:
        self.progress = progress
        self.kl_cap = kl_cap
        self.best = best
        self.task = progress.add_task("trials", total=total, completed=done,
                                      best=self._best_text()) if progress else None

    def _best_text(self) -> str:
        if self.best is None:
            return f"best: none yet under KL {self.kl_cap:g}"
        b = self.best
        return f"best: {b.refusals}/{b.n_harmful} refusals at KL {b.kl:.3f}"

    def offer(self, score: TrialScore) -> None:
        """Take ``score`` as the best when it is under the cap and refuses less."""
        if score.kl <= self.kl_cap and (self.best is None or
                                        (score.refusals, score.kl) < (self.best.refusals,
                                                                      self.best.kl)):
            self.best = score

    def __call__(self, trial: FrozenTrial, score: TrialScore, seconds: float) -> None:
        self.offer(score)
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, advance=1, best=self._best_text())


@contextmanager
def search_progress(enabled: bool, console: Console | None = None) -> Iterator[Progress | None]:
    """A rich progress bar on stderr (or nothing when disabled)."""
    if not enabled:
        yield None
        return
    progress = counting_bar(TextColumn("{task.fields[best]}"), TimeElapsedColumn(),
                            TextColumn("left"), TimeRemainingColumn(), console=console,
                            refresh_per_second=2)
    with progress:
        yield progress


__all__ = ["SearchDisplay", "search_progress"]
