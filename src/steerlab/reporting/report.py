"""One report writer for every experiment: ``report.html`` (self-contained,
opens offline: figures inlined as base64 PNG) and ``report.md`` (same tables,
figures linked), built from measurements the experiment just made.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerlab.store.atomic import write_text

VERDICTS = ("reproduced", "not reproduced", "inconclusive")


class Finding(dict[str, str]):
    """One claim checked against this run's numbers: its verdict and the evidence.

    A dict, so results.json holds it as it is (``{"claim", "verdict", "evidence"}``) and
    ``Finding(**entry)`` reads one back; a verdict outside :data:`VERDICTS` fails here,
    where the experiment makes the finding.
    """

    def __init__(self, claim: str, verdict: str, evidence: str) -> None:
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        super().__init__(claim=claim, verdict=verdict, evidence=evidence)


@dataclass(frozen=True)
class Table:
    """A titled table: ``columns`` name the keys read from each row dict."""

    title: str
    columns: Sequence[str]
    rows: Sequence[dict[str, Any]]
    note: str = ""


@dataclass(frozen=True)
class Figure:
    """A PNG written by the experiment, with a caption saying what it shows."""

    path: Path
    caption: str


@dataclass(frozen=True)
class Sample:
    condition: str
    prompt: str
    response: str
    label: str


@dataclass
class Report:
    """Everything a report shows; ``write`` renders it as HTML and Markdown."""

    title: str
    summary: str
    findings: list[Finding] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        out = Path(out_dir)
        html_path, md_path = out / "report.html", out / "report.md"
        write_text(html_path, self.to_html())
        write_text(md_path, self.to_markdown(out))
        return html_path, md_path

    # -- Markdown -----------------------------------------------------------------------------
    def to_markdown(self, base: Path | None = None) -> str:
        lines = [f"# {self.title}", "", self.summary, ""]
        if self.findings:
            lines += ["## Findings", "", "| claim | verdict | evidence |", "| --- | --- | --- |"]
            lines += [
                f"| {_md(f['claim'])} | **{f['verdict']}** | {_md(f['evidence'])} |"
                for f in self.findings
            ]
            lines.append("")
        for table in self.tables:
            lines += [f"## {table.title}", ""]
            if table.note:
                lines += [table.note, ""]
            lines.append("| " + " | ".join(table.columns) + " |")
            lines.append("| " + " | ".join("---" for _ in table.columns) + " |")
            for row in table.rows:
                lines.append(
                    "| " + " | ".join(_md(_fmt(row.get(c, ""))) for c in table.columns) + " |"
                )
            lines.append("")
        if self.figures:
            lines += ["## Figures", ""]
            for fig in self.figures:
                rel = (
                    fig.path.relative_to(base)
                    if base and fig.path.is_relative_to(base)
                    else fig.path
                )
                lines += [f"![{fig.caption}]({rel})", "", f"*{fig.caption}*", ""]
        if self.samples:
            lines += ["## Sample generations", ""]
            for s in self.samples:
                lines += [
                    f"**{s.condition}** ({s.label}) — *{_md(s.prompt)}*",
                    "",
                    "> " + _md(s.response).replace("\n", "\n> "),
                    "",
                ]
        lines += [
            "## Provenance",
            "",
            "```json",
            json.dumps(self.provenance, indent=2, default=str),
            "```",
            "",
        ]
        return "\n".join(lines)

    # -- HTML ---------------------------------------------------------------------------------
    def to_html(self) -> str:
        e = html.escape
        parts = [f"<h1>{e(self.title)}</h1>", f"<p>{e(self.summary)}</p>"]
        if self.findings:
            parts.append(
                "<h2>Findings</h2><table><tr><th>claim</th><th>verdict</th><th>evidence</th></tr>"
            )
            for f in self.findings:
                cls = f["verdict"].replace(" ", "-")
                parts.append(
                    f"<tr><td>{e(f['claim'])}</td><td class='{cls}'>{e(f['verdict'])}</td>"
                    f"<td>{e(f['evidence'])}</td></tr>"
                )
            parts.append("</table>")
        for table in self.tables:
            parts.append(f"<h2>{e(table.title)}</h2>")
            if table.note:
                parts.append(f"<p class='note'>{e(table.note)}</p>")
            parts.append(
                "<div class='wide'><table><tr>"
                + "".join(f"<th>{e(c)}</th>" for c in table.columns)
                + "</tr>"
            )
            for row in table.rows:
                parts.append("<tr>" + "".join(_cell(_fmt(row.get(c, ""))) for c in table.columns)
                             + "</tr>")
            parts.append("</table></div>")
        for fig in self.figures:
            data = base64.b64encode(fig.path.read_bytes()).decode("ascii")
            parts.append(
                f"<figure><img alt='{e(fig.caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{e(fig.caption)}</figcaption></figure>"
            )
        if self.samples:
            parts.append("<h2>Sample generations</h2>")
            for s in self.samples:
                parts.append(
                    f"<div class='sample'><div class='meta'><b>{e(s.condition)}</b> "
                    f"<span class='label {e(s.label)}'>{e(s.label)}</span></div>"
                    f"<div class='prompt'>{e(s.prompt)}</div>"
                    f"<pre>{e(s.response)}</pre></div>"
                )
        parts.append(
            "<h2>Provenance</h2><pre>"
            + e(json.dumps(self.provenance, indent=2, default=str))
            + "</pre>"
        )
        return _PAGE.format(title=e(self.title), body="\n".join(parts))


def _fmt(value: Any) -> str:
    if value is None:  # a measure that does not apply to the row (baseline vs itself)
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-3 and value != 0 else f"{value:.3f}"
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, float) for v in value)
    ):
        return f"[{value[0]:.3f}, {value[1]:.3f}]"
    return str(value)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _cell(text: str) -> str:
    """A table cell: short values (numbers, intervals) never wrap, prose gets room to."""
    cls = "text" if len(text) > 28 else "num"
    return f"<td class='{cls}'>{html.escape(text)}</td>"


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }}
.wide {{ overflow-x: auto; }} td.num {{ white-space: nowrap; }} td.text {{ min-width: 18em; }}
td.reproduced {{ background: #dff3df; font-weight: bold; }}
td.not-reproduced {{ background: #f8dcdc; font-weight: bold; }}
td.inconclusive {{ background: #f6efd0; font-weight: bold; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; border: 1px solid #ddd; }}
figcaption {{ font-size: 0.9em; color: #555; }}
.sample {{ border-left: 3px solid #bbb; margin: 0.8em 0; padding-left: 0.8em; }}
.prompt {{ font-style: italic; }}
pre {{ white-space: pre-wrap; background: #fafafa; padding: 6px; }}
.label {{ font-size: 0.8em; padding: 1px 6px; border-radius: 3px; background: #eee; }}
.label.refusal {{ background: #dbe8ff; }} .label.bypass {{ background: #ffe0d6; }}
.label.degenerate {{ background: #eee0ff; }} .note {{ color: #555; font-size: 0.9em; }}
</style></head><body>
{body}
</body></html>
"""
