"""The progress bar of a generation run: prompts done, prompts/s and tokens/s, ETA.

Drawn on stderr, so a command's stdout stays clean for its results.
"""

from __future__ import annotations

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


def generation_progress(enabled: bool) -> Progress:
    """A bar counting prompts with their rates (update its ``tokens`` field); drawn only
    when ``enabled``."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    _Rates(), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=False, disable=not enabled)


__all__ = ["generation_progress"]
