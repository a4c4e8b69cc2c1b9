"""Progress bars, on stderr unless told otherwise so a command's stdout stays clean for its
results: the counting bar every long run starts from, and a generation run's (with rates)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _Rates(ProgressColumn):
    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        if elapsed <= 0:
            return Text("– prompts/s  – tok/s", style="cyan")
        tokens = task.fields.get("tokens", 0)
        return Text(f"{task.completed / elapsed:.2f} prompts/s  {tokens / elapsed:.1f} tok/s",
                    style="cyan")


def counting_bar(*columns: str | ProgressColumn, console: Console | None = None,
                 **options: Any) -> Progress:
    """A rich bar showing the task's name, the bar and done/total, then ``columns``; on
    ``console`` (default: stderr), with ``options`` passed on to :class:`rich.progress.Progress`."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    *columns, console=console or Console(stderr=True), **options)


def generation_progress(enabled: bool) -> Progress:
    """A bar counting prompts with their rates (update its ``tokens`` field); drawn only
    when ``enabled``."""
    return counting_bar(_Rates(), TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
                        disable=not enabled)


__all__ = ["counting_bar", "generation_progress"]
