"""The shared experiment machinery: resumable response store and report writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import steerlab.reporting.plots as plots
from steerlab.errors import SteerlabError
from steerlab.experiments.store import ResponseStore
from steerlab.reporting.report import Figure, Finding, Report, Sample, Table

IDENTITY = {"model_fingerprint": "0123", "dtype": "float32"}


def _row(cond: str, pid: str) -> dict[str, object]:
    return {
        "condition": cond,
        "prompt_id": pid,
        "response": f"r-{cond}-{pid}",
        "outcome": "refusal",
    }


def test_store_resumes_and_drops_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "responses.jsonl"
    store = ResponseStore(path, IDENTITY)
    store.append([_row("a", "1"), _row("a", "2")])
    with path.open("a") as handle:  # an interrupted write leaves half a line
        handle.write('{"condition": "a", "prompt_id": "3", "resp')
    again = ResponseStore(path, IDENTITY)
    assert again.has("a", "1") and again.has("a", "2") and not again.has("a", "3")
    again.append([_row("a", "3")])
    lines = path.read_text().splitlines()[1:]  # after the header
    assert [json.loads(line)["prompt_id"] for line in lines] == ["1", "2", "3"]


def test_store_refuses_corruption_in_the_middle(tmp_path: Path) -> None:
    path = tmp_path / "responses.jsonl"
    ResponseStore(path, IDENTITY)
    with path.open("a") as handle:
        handle.write('{"condition": "a", "prompt_id": "1"}\nnot json\n'
                     '{"condition": "a", "prompt_id": "2"}\n')
    before = path.read_bytes()
    with pytest.raises(SteerlabError, match="line 3"):
        ResponseStore(path, IDENTITY)
    assert path.read_bytes() == before


def test_report_renders_self_contained_html_and_markdown(tmp_path: Path) -> None:
    png = plots.bars_with_ci(
        tmp_path / "figures" / "bars.png",
        ["a", "b"],
        [0.2, 0.6],
        [[0.1, 0.4], [0.4, 0.8]],
        title="t",
        ylabel="rate",
    )
    report = Report(
        title="T <test>",
        summary="S",
        findings=[Finding("claim one", "reproduced", "p=0.01")],
        tables=[
            Table(
                "Conditions",
                ["condition", "rate", "ci", "p"],
                [{"condition": "a|b", "rate": 0.25, "ci": [0.1, 0.4], "p": None}],
            )
        ],
        figures=[Figure(png, "bars")],
        samples=[Sample("baseline", "a prompt", "<script>x</script>", "refusal")],
        provenance={"seed": 0},
    )
    html_path, md_path = report.write(tmp_path)
    html = html_path.read_text()
    assert "data:image/png;base64," in html and "src='figures" not in html
    assert "&lt;script&gt;" in html and "<script>" not in html
    assert "T &lt;test&gt;" in html
    md = md_path.read_text()
    assert "| claim one | **reproduced** | p=0.01 |" in md
    assert "a\\|b" in md and "[0.100, 0.400]" in md
    assert "| [0.100, 0.400] | — |" in md and "None" not in md + html  # not applicable
    assert "![bars](figures/bars.png)" in md


def test_finding_rejects_unknown_verdict() -> None:
    with pytest.raises(ValueError, match="verdict"):
        Finding("c", "maybe", "e")


def test_runner_refuses_to_resume_a_run_of_other_settings(tmp_path: Path) -> None:
    from steerlab.experiments.runner import Runner
    from tests.tiny import tiny_model

    lm = tiny_model("qwen2")
    settings = {"limit": 8, "alphas": [4.0, 8.0], "n_samples": 2, "batch_size": 16}
    Runner(lm, tmp_path / "run", show_progress=False, settings=settings)
    # Same settings, or a change that only affects the report or the speed: resumes.
    Runner(lm, tmp_path / "run", show_progress=False, settings={**settings, "n_samples": 5})
    Runner(lm, tmp_path / "run", show_progress=False, settings={**settings, "batch_size": 4})
    with pytest.raises(SteerlabError, match=r"alphas: \[4.0, 8.0\] -> \[4.0\].*new --out"):
        Runner(lm, tmp_path / "run", show_progress=False, settings={**settings, "alphas": [4.0]})
    lm.fingerprint = "0" * 16  # another model in the same folder
    with pytest.raises(SteerlabError, match="model fingerprint"):
        Runner(lm, tmp_path / "run", show_progress=False, settings=settings)
    head = json.loads((tmp_path / "run" / "responses.jsonl").read_text().splitlines()[0])
    assert head["identity"]["settings"]["alphas"] == [4, 8]
    assert head["identity"]["dtype"] == "float32"


def test_runner_keeps_generation_timings_across_interruptions(tmp_path: Path) -> None:
    from steerlab.experiments.runner import Condition, Runner
    from steerlab.prompts.sets import load_prompts
    from tests.tiny import tiny_model

    lm = tiny_model("qwen2")
    prompts = load_prompts("paired:harmful", split="test", limit=4)
    first = Runner(lm, tmp_path, max_new_tokens=2, batch_size=2, show_progress=False)
    first.run(Condition("baseline"), prompts)
    # A new process on the same folder (as after a kill) starts from the recorded cost.
    resumed = Runner(lm, tmp_path, max_new_tokens=2, batch_size=2, show_progress=False)
    assert resumed.timings.generated_prompts == {"baseline": 4}
    assert resumed.timings.generation["baseline"] > 0
    resumed.run(Condition("baseline"), prompts)  # nothing left to generate: cost unchanged
    assert resumed.timings.generated_prompts == {"baseline": 4}


def test_run_many_equals_separate_runs_and_keeps_rows_finished_before_a_crash(
    tmp_path: Path,
) -> None:
    """Conditions sharing batches give each prompt what its condition gives run alone,
    returned in prompt order; rows finished before an exception are on disk, and the
    rerun generates only the rest."""
    import torch

    from steerlab.directions.artifact import Direction
    from steerlab.experiments.runner import Condition, Job, Runner
    from steerlab.interventions.specs import Add
    from steerlab.prompts.sets import load_prompts
    from tests.tiny import tiny_model

    lm = tiny_model("qwen2", dtype=torch.float32)
    prompts = load_prompts("paired:harmful", split="test", limit=5)
    d = Direction(torch.randn(lm.n_layers, lm.d_model) * 20, tuple(range(lm.n_layers)))
    conds = [
        Condition("plain"),
        Condition("steered", (Add(d, 1.0, layers=[1]),)),
        Condition("system", system="Answer in one word."),
    ]
    alone = Runner(lm, tmp_path / "alone", max_new_tokens=4, batch_size=1, show_progress=False)
    expected = [alone.run(c, prompts) for c in conds]
    shared = Runner(lm, tmp_path / "shared", max_new_tokens=4, batch_size=4, show_progress=False)
    calls = [0]

    def crash_on_third_batch(module, args, kwargs):  # type: ignore[no-untyped-def]
        ids = kwargs["input_ids"]
        cached = kwargs.get("cache", kwargs.get("past_key_values")) is not None
        # a batch's prefill: more than one token, no cache yet. Not counted: the one-row
        # check of shared prefills and their stored-state pass (which fills a cache),
        # and the system prompt's one-row remainder batch.
        if ids.shape[1] > 1 and not cached and ids.shape[0] > 1:
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("power cut")

    handle = lm.model.register_forward_pre_hook(crash_on_third_batch, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="power cut"):
            shared.run_many([Job(c, prompts) for c in conds])
    finally:
        handle.remove()
    kept = ResponseStore(tmp_path / "shared" / "responses.jsonl").rows()
    assert 8 <= len(kept) < 15  # the batches before the third of four rows were saved
    resumed = Runner(lm, tmp_path / "shared", max_new_tokens=4, batch_size=4,
                     show_progress=False)
    got = resumed.run_many([Job(c, prompts) for c in conds])
    # each shared batch's time is split between the conditions whose rows it ran
    assert set(resumed.timings.generation) == {c.name for c in conds}
    assert all(v > 0 for v in resumed.timings.generation.values())
    assert resumed.timings.generated_prompts == {c.name: 5 for c in conds}
    assert [[r["prompt_id"] for r in rows] for rows in got] == [[p.id for p in prompts]] * 3
    assert [[r["response"] for r in rows] for rows in got] == \
        [[r["response"] for r in rows] for rows in expected]
    assert [r["response"] for r in got[1]] != [r["response"] for r in got[0]]
    stored = ResponseStore(tmp_path / "shared" / "responses.jsonl").rows()
    assert len(stored) == 15 and stored[: len(kept)] == kept  # nothing generated twice
    with pytest.raises(SteerlabError, match="twice"):
        shared.run_many([Job(conds[0], prompts), Job(conds[0], prompts)])


def test_rate_by_layer_labels_each_series_as_given(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import matplotlib.axes

    seen: list[list[str]] = []
    original = matplotlib.axes.Axes.legend

    def recording_legend(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(self.get_legend_handles_labels()[1])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "legend", recording_legend)
    path = plots.rate_by_layer(
        tmp_path / "readd.png", [0, 1], [0.2, 0.6], [[0.1, 0.3], [0.5, 0.7]],
        title="t", ylabel="refusal rate", label="harmful prompts",
        references={"baseline": (0.5, [0.4, 0.6])}, spans={"late third": (0.5, 1.5)},
        more={"harmless prompts": ([0.0, 0.1], [[0.0, 0.05], [0.05, 0.2]])},
    )
    assert path.stat().st_size > 0
    assert seen == [["late third", "baseline (50%)", "harmful prompts", "harmless prompts"]]


def test_stale_results_an_edited_prompt_file_never_resumes_its_old_rows(tmp_path: Path) -> None:
    """The run identity holds each user prompt file's content hash (built-in names stay as
    they are), so rows generated from the old texts of an edited file are never reused."""
    from steerlab.experiments.runner import Runner
    from tests.tiny import tiny_model

    lm = tiny_model("qwen2")
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text('{"id": "a", "text": "How do I bake bread?"}\n')
    settings = {"eval_prompts": str(prompts), "harmless_prompts": "harmless", "limit": 1}
    Runner(lm, tmp_path / "run", show_progress=False, settings=settings)
    Runner(lm, tmp_path / "run", show_progress=False, settings=settings)  # unchanged: resumes
    head = json.loads((tmp_path / "run" / "responses.jsonl").read_text().splitlines()[0])
    assert list(head["identity"]["prompt_files"]) == ["eval_prompts"]
    prompts.write_text('{"id": "a", "text": "How do I pick a lock?"}\n')  # same id, new text
    with pytest.raises(SteerlabError, match="prompt_files"):
        Runner(lm, tmp_path / "run", show_progress=False, settings=settings)
