"""``steerlab data list`` and ``steerlab data show NAME_OR_PATH``: look at prompt sets."""

from __future__ import annotations

import typer
from rich.table import Table
from rich.text import Text

from steerlab.cli.common import console

SHOW_CHARS = 300
"""Characters of a field ``data show`` prints; the rest is counted, not printed (a line of
megabytes would take rich minutes to wrap)."""

SOURCE_ARG = typer.Argument(
    ..., help="Built-in set name (e.g. paired, paired:harmful) or a .jsonl/.json/.csv/.txt file."
)


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Inspect built-in prompt sets and prompt files.",
                           no_args_is_help=True)
    app.add_typer(data_app, name="data")

    @data_app.command("list")
    def list_sets() -> None:
        """List the built-in prompt sets with their sizes."""
        from steerlab.prompts.sets import builtin_sets, load_prompts

        table = Table(title="steerlab built-in prompt sets")
        for column in ("name", "prompts", "pairs", "categories", "what"):
            table.add_column(column, justify="right" if column in ("prompts", "pairs") else "left")
        for name, builtin in builtin_sets().items():
            pset = load_prompts(name)
            n_pairs = len({p.pair_id for p in pset if p.pair_id})
            table.add_row(name, str(len(pset)), str(n_pairs or "-"), str(len(pset.categories())),
                          builtin.description)
        console.print(table)
        console.print("Each set has a data card: BuiltinSet.card() in Python, "
                      "or steerlab/data/cards/ in the package.", style="dim")

    @data_app.command("show")
    def show(
        source: str = SOURCE_ARG,
        split: str | None = typer.Option(None, "--split", help="train, val or test."),
        label: str | None = typer.Option(None, "--label", help="Keep only this label."),
        examples: int = typer.Option(3, "--examples", "-n", help="How many examples to print."),
    ) -> None:
        """Print a prompt set's count, categories, labels and a few examples."""
        from steerlab.prompts.sets import load_prompts

        pset = load_prompts(source, split=split, label=label)
        split_note = f", {pset.split} split" if pset.split else ""
        console.print(Text.assemble((clip(pset.name), "bold"), f": {len(pset)} prompts{split_note} "
                                    f"(from {clip(pset.source)})"))
        counts = Table(show_header=True)
        counts.add_column("category")
        counts.add_column("prompts", justify="right")
        for category, n in sorted(pset.categories().items(), key=lambda kv: (-kv[1], kv[0])):
            counts.add_row(clip(category or "(none)"), str(n))
        console.print(counts)
        if pset.labels():
            labels = ", ".join(f"{clip(k)} {v}" for k, v in pset.labels().items())
            console.print(f"labels: {labels}")
        # Evenly spaced examples show more of the set than the first few lines.
        count = min(max(examples, 0), len(pset))
        for i in sorted({j * len(pset) // count for j in range(count)} if count else set()):
            p = pset[i]
            tag = "/".join(x for x in (p.category, p.label) if x)
            console.print(Text.assemble((clip(p.id), "cyan"), " ", (clip(tag), "dim"),
                                        f"\n  {clip(p.prompt)}"))


def clip(text: str, limit: int = SHOW_CHARS) -> str:
    """``text`` cut to ``limit`` characters, with the cut counted."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"... ({len(text) - limit} more characters)"
