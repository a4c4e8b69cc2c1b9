"""The machinery every experiment shares: cached steps, cached directions,
resumable generation conditions with scores, one progress display with ETA.

An experiment is a sequence of named steps; each step's result is cached in
the run folder, so rerunning the same command after an interruption resumes
where it stopped and never repeats a finished generation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from rich import get_console
from rich.progress import TextColumn, TimeElapsedColumn, TimeRemainingColumn

from steerlab.directions.artifact import Direction
from steerlab.errors import SteerlabError
from steerlab.evaluate.outcome import outcome
from steerlab.experiments.store import ResponseStore, run_identity
from steerlab.experiments.timings import Timings
from steerlab.generation.generate import Generation, GenerationGroup, generate_groups
from steerlab.generation.progress import counting_bar
from steerlab.store.atomic import write_json

if TYPE_CHECKING:
    from steerlab.model.loading import LoadedModel
    from steerlab.prompts.sets import PromptSet

T = TypeVar("T")

# Finished rows are written to disk at most this long after they finish (and always
# when a run_many call ends, normally or not).
SAVE_EVERY_SECONDS = 1.0
# Redraws per second of the progress display. Each redraw costs ~0.4 ms of Python per bar
# on a terminal, taken from the threads generating: at rich's default 10/s with a bar per
# condition (~80 in a persona-gating run) a 2-core CPU generated 26% slower.
PROGRESS_REFRESH_PER_SECOND = 2


@dataclass(frozen=True)
class Condition:
    """One generation condition: interventions and/or a system prompt over a prompt set."""

    name: str
    specs: tuple[Any, ...] = ()
    system: str | None = None
    description: str = ""


@dataclass(frozen=True)
class Job:
    """One condition over one prompt set, for :meth:`Runner.run_many`."""

    condition: Condition
    prompts: PromptSet
    tag: str = ""
    keep_first_token: bool = False


class Runner:
    """Runs the steps of one experiment in ``out_dir`` against one model."""

    def __init__(
        self,
        lm: LoadedModel,
        out_dir: str | Path,
        *,
        max_new_tokens: int = 32,
        batch_size: int = 16,
        show_progress: bool = True,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.lm = lm
        self.out = Path(out_dir)
        # refuses a folder it did not write, or a run of another model, dtype or settings
        self.store = ResponseStore.open_run(self.out, run_identity(lm, settings))
        (self.out / "steps").mkdir(exist_ok=True)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.timings = Timings.load(self.out / "timings.json")
        self.progress = counting_bar(
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=get_console(),  # the experiment's own output stream
            disable=not show_progress,
            transient=False,
            refresh_per_second=PROGRESS_REFRESH_PER_SECOND,
        )
        self._overall: Any = None
        # condition -> prompt id -> first response token log-probs [V] (float32, CPU), kept
        # in memory for runs asked to (first-token KL from the generations themselves).
        self.first_token_logprobs: dict[str, dict[str, Any]] = {}

    # -- timings, kept across interruptions ---------------------------------------------------
    def _save_timings(self) -> None:
        path = self.out / "timings.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data.update(self.timings.as_dict())
        write_json(path, data)

    # -- progress -----------------------------------------------------------------------------
    def __enter__(self) -> Runner:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def plan(self, total_units: int, description: str = "overall") -> None:
        """Declare the total work (generations) so the overall bar can estimate time left."""
        self._overall = self.progress.add_task(description, total=total_units)

    def _advance(self, units: int) -> None:
        if self._overall is not None:
            self.progress.advance(self._overall, units)

    # -- cached steps -------------------------------------------------------------------------
    def has_step(self, name: str) -> bool:
        """Whether step ``name`` is already cached in the run folder."""
        return (self.out / "steps" / f"{name}.json").exists()

    def step(self, name: str, compute: Callable[[], T]) -> T:
        """Return the result of step ``name`` as its JSON reads back, computing it once: a
        fresh run and a resumed one get the same types (integer keys are strings in both)."""
        path = self.out / "steps" / f"{name}.json"
        if not self.has_step(name):
            task = self.progress.add_task(name, total=None)
            start = time.perf_counter()
            result = compute()
            self.save_step(name, result, time.perf_counter() - start)
            self.progress.update(task, total=1, completed=1)
        return json.loads(path.read_text())  # type: ignore[no-any-return]

    def save_step(self, name: str, result: Any, seconds: float) -> None:
        """Cache the result of a step computed outside :meth:`step` (several steps measured
        at once), with the seconds it is credited in ``timings.json``."""
        self.timings.steps[name] = seconds
        self._save_timings()
        write_json(self.out / "steps" / f"{name}.json", result)

    def direction(self, name: str, compute: Callable[[], Direction]) -> Direction:
        """Return the cached direction ``name`` (saved under ``directions/``), extracting once."""
        folder = self.out / "directions" / name
        if (folder / "direction.json").exists():
            return Direction.load(folder, self.lm)
        task = self.progress.add_task(f"extract {name}", total=None)
        start = time.perf_counter()
        direction = compute()
        self.timings.steps[f"extract_{name}"] = time.perf_counter() - start
        self._save_timings()
        direction.save(folder)
        self.progress.update(task, total=1, completed=1)
        return direction

    # -- generation ---------------------------------------------------------------------------
    def run(
        self,
        condition: Condition,
        prompts: PromptSet,
        *,
        tag: str = "",
        keep_first_token: bool = False,
    ) -> list[dict[str, Any]]:
        """Generate and score ``prompts`` under ``condition``; only missing rows are generated.

        With ``keep_first_token`` the first response token's log-probs of every prompt
        generated now land in :attr:`first_token_logprobs` (rows resumed from disk have
        none: callers recompute those).
        """
        return self.run_many([Job(condition, prompts, tag, keep_first_token)])[0]

    def run_many(self, jobs: Sequence[Job]) -> list[list[dict[str, Any]]]:
        """Run several conditions together, their rows sharing generation batches.

        Each row is scored and stored soon after it finishes, so an interruption
        loses only unfinished rows. Returns each job's rows in its prompts' order.
        A shared batch's wall time is split between its conditions by their rows
        in it.
        """
        names = [job.condition.name for job in jobs]
        if len(set(names)) != len(names):
            raise SteerlabError(f"run_many got a condition twice: {names}.")
        todo = [[p for p in job.prompts if not self.store.has(job.condition.name, p.id)]
                for job in jobs]
        # One bar per call, not per condition: the display stays short and cheap to redraw.
        done = sum(len(job.prompts) - len(pending) for job, pending in zip(jobs, todo, strict=True))
        task = self.progress.add_task(_bar_label(jobs), total=sum(len(j.prompts) for j in jobs),
                                      completed=done)
        self._advance(done)
        active = [j for j, pending in enumerate(todo) if pending]
        if active:
            unsaved: list[dict[str, Any]] = []
            saved_at = [time.perf_counter()]

            def save() -> None:  # fsynced in groups, not per row (a run stores ~2,000 rows)
                self.store.append(unsaved)
                unsaved.clear()
                self._save_timings()
                saved_at[0] = time.perf_counter()

            def on_done(g: int, gen: Generation) -> None:
                j = active[g]
                job, prompt = jobs[j], todo[j][gen.index]
                name = job.condition.name
                label = outcome(gen.response)
                unsaved.append({
                    "condition": name,
                    "prompt_id": prompt.id,
                    "set": job.tag or job.prompts.name,
                    "prompt": prompt.prompt,
                    "system": job.condition.system,
                    "response": gen.response,
                    "outcome": label,
                    "refusal": label == "refusal",
                    "n_new_tokens": gen.n_new_tokens,
                })
                self.timings.generated_prompts[name] = (
                    self.timings.generated_prompts.get(name, 0) + 1
                )
                if time.perf_counter() - saved_at[0] >= SAVE_EVERY_SECONDS:
                    save()
                self.progress.advance(task, 1)
                self._advance(1)

            def on_batch(keys: list[tuple[int, int]], seconds: float) -> None:
                for g, _ in keys:
                    name = jobs[active[g]].condition.name
                    self.timings.generation[name] = (
                        self.timings.generation.get(name, 0.0) + seconds / len(keys)
                    )

            def on_first(keys: list[tuple[int, int]], logits: Any) -> None:
                logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
                for row, (g, i) in enumerate(keys):
                    job = jobs[active[g]]
                    if job.keep_first_token:
                        kept = self.first_token_logprobs.setdefault(job.condition.name, {})
                        kept[todo[active[g]][i].id] = logprobs[row]

            keeps = any(jobs[j].keep_first_token for j in active)
            try:
                generate_groups(
                    self.lm,
                    [GenerationGroup([p.prompt for p in todo[j]], jobs[j].condition.specs,
                                     jobs[j].condition.system) for j in active],
                    max_new_tokens=self.max_new_tokens,
                    batch_size=self.batch_size,
                    on_done=on_done,
                    on_first_logits=on_first if keeps else None,
                    on_batch=on_batch,
                )
            finally:  # finished rows survive an exception in a later batch
                save()
        out = []
        for job in jobs:
            mine = {r["prompt_id"]: r for r in self.store.rows(job.condition.name)}
            out.append([mine[p.id] for p in job.prompts if p.id in mine])
        return out

    def rows(self, condition: str) -> list[dict[str, Any]]:
        return self.store.rows(condition)


def _bar_label(jobs: Sequence[Job]) -> str:
    """The condition's name for one job; for several, how many and over which prompt sets."""
    if len(jobs) == 1:
        return jobs[0].condition.name
    sets = dict.fromkeys(job.tag or job.prompts.name for job in jobs)
    return f"{len(jobs)} conditions ({', '.join(sets)})"
