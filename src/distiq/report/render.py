"""Render a report as Markdown and as one self-contained HTML file (PNGs inlined as base64).

The content is built once as a list of blocks (headings, paragraphs, tables, images, lists) and
written by two small writers, so both files always say the same thing. ``write_report`` checks
that the output directory is writable *before* drawing anything, renders everything in memory,
then writes each file atomically (temporary file + rename): a failure never leaves a
half-written file, and an earlier report stays intact until its replacement is complete.
"""

from __future__ import annotations

import base64
import html
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from distiq import __version__, config
from distiq.config import atomic_write
from distiq.report import latency, plots, sections, stats
from distiq.report.blocks import Block, Bullets, Heading, Image, Paragraph, TableBlock
from distiq.report.goals import DEFAULT_GOALS, Goal, GoalCheck, check_goals, goals_summary
from distiq.report.groups import group_records
from distiq.report.inputs import ReportInputs, collect_inputs
from distiq.report.tables import group_by_metric, machines, merge_table, question_type_table

__all__ = [
    "REPORT_HTML",
    "REPORT_MD",
    "Block",
    "Bullets",
    "Heading",
    "Image",
    "Paragraph",
    "RenderedReport",
    "ReportFiles",
    "TableBlock",
    "build_blocks",
    "check_writable",
    "render",
    "report",
    "to_html",
    "to_markdown",
    "write_report",
]

logger = logging.getLogger(__name__)

REPORT_MD = "report.md"
REPORT_HTML = "report.html"


@dataclass
class RenderedReport:
    """A rendered report: ``markdown`` and ``html`` text, the ``images`` ``{file: PNG bytes}``
    the Markdown links to (the HTML embeds them) and the ``goals`` it shows, checked."""

    markdown: str
    html: str
    images: dict[str, bytes] = field(default_factory=dict)
    goals: list[GoalCheck] = field(default_factory=list)


@dataclass(frozen=True)
class ReportFiles:
    """Paths written by :func:`write_report`, and the ``goals`` it checked (as rendered)."""

    markdown: Path
    html: Path
    images: list[Path]
    goals: list[GoalCheck] = field(default_factory=list)


# --------------------------------------------------------------------------- content
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"


def _goal_blocks(checks: list[GoalCheck]) -> list[Block]:
    rows = [[c.goal, c.measured, c.status] for c in checks]
    return [
        Heading("Goals"),
        Paragraph(
            f"{goals_summary(checks)} Each goal is checked from the groups of its task and "
            "metric above: a method's mean over its seeds (where several groups fit one "
            "setting, the best mean, for the method under test and its baselines alike). A "
            "method beats a baseline only when the paired test on the same questions rejects a "
            f"tie (p < {stats.ALPHA:g}); otherwise the goal is a tie."
        ),
        TableBlock((["goal", "measured", "status"], rows), status_column=2),
    ]


def build_blocks(
    inputs: ReportInputs, goals: Sequence[Goal] = DEFAULT_GOALS
) -> tuple[list[Block], dict[str, bytes], list[GoalCheck]]:
    """The report's content (blocks), the PNG images it refers to and the checked ``goals``
    (shown in a section of their own; none: no such section), from ``inputs`` only."""
    records = inputs.records
    blocks: list[Block] = [
        Heading("distiq report", 1),
        Paragraph(
            f"Rendered by distiq {__version__} from {len(records)} result record(s) and the "
            f"training metrics of {len(inputs.curves)} run(s); {len(inputs.predictions)} run(s) "
            "left their answer to each test question (predictions.jsonl), which the paired "
            "comparisons are tested on."
        ),
    ]
    images: dict[str, bytes] = {}

    groups = group_by_metric(records)
    by_metric = {key: group_records(members) for key, members in groups.items()}
    if not groups:
        blocks.append(Paragraph("No result records were found: there is no results table."))
    else:
        front, pictures = sections.frontier_blocks(by_metric)
        blocks += front
        images.update(pictures)
    for (task, metric), members in groups.items():
        blocks += sections.results_blocks(
            task, metric, members, by_metric[(task, metric)], inputs.predictions
        )
    blocks += sections.ablation_blocks(
        [g for found in by_metric.values() for g in found], inputs.predictions
    )

    every = [r for group in groups.values() for r in group]
    unique = list({r.name: r for r in every}.values())
    per_backend = latency.backend_table(unique)
    if per_backend is not None:
        blocks += [
            Heading("Latency per backend"),
            Paragraph(latency.backend_table_note(unique)),
            TableBlock(per_backend),
        ]

    merges = merge_table(every)
    if merges is not None:
        blocks += [
            Heading("Merging adapters and re-quantizing"),
            Paragraph(
                "A QLoRA-style run trains adapters on a frozen quantized base; deploying it merges "
                "the adapters into the weights and quantizes them again. The table shows what "
                "that step cost (the results table reports the deployed model)."
            ),
            TableBlock(merges),
        ]

    checks = check_goals(records, goals, inputs.predictions) if goals else []
    if goals:
        blocks += _goal_blocks(checks)

    per_type = question_type_table(every)
    if per_type is not None:
        blocks += [Heading("Accuracy per question type"), TableBlock(per_type)]

    for title, file, draw, missing in (
        ("Accuracy vs latency", "accuracy_vs_latency.png", plots.accuracy_vs_latency, "latency"),
    ):
        blocks.append(Heading(title))
        drawn = [draw(group) for group in groups.values()]
        drawn_any = False
        for index, png in enumerate(drawn):
            if png is None:
                continue
            name = file if index == 0 else file.replace(".png", f"_{index}.png")
            images[name] = png
            blocks.append(Image(name, title))
            drawn_any = True
        if not drawn_any:
            blocks.append(Paragraph(f"Not drawn: no record has both {missing} and accuracy."))
        elif missing == "latency":
            blocks.append(
                Paragraph(
                    "Each point is a model's headline latency, on the backend named in its label: "
                    "points on different backends are not a speed comparison (the results "
                    "table's speed column is)."
                )
            )

    blocks.append(Heading("Training curves"))
    if not inputs.curves:
        blocks.append(Paragraph("No run metrics (metrics.jsonl) were found."))
    for run in inputs.curves:
        blocks.append(Heading(run.name, 3))
        png = plots.training_curves(run)
        if png is None:
            blocks.append(Paragraph("The run logged no finite values."))
            continue
        name = f"curves_{_slug(run.name)}.png"
        suffix = 2
        while name in images:
            name = f"curves_{_slug(run.name)}_{suffix}.png"
            suffix += 1
        images[name] = png
        blocks.append(Image(name, f"training curves of {run.name}"))

    blocks.append(Heading("Machine"))
    found = machines(records)
    if found:
        blocks.append(Bullets([f"{desc} — {', '.join(names)}" for desc, names in found]))
    else:
        blocks.append(Paragraph("The result records do not say which machine measured them."))

    blocks.append(Heading("Sources"))
    blocks.append(Bullets(_sources(inputs.sources)))
    return blocks, images, checks


def _sources(paths: list[Path]) -> list[str]:
    """The files read, one line per folder: ``folder/: results.json, predictions.jsonl``."""
    by_folder: dict[Path, list[str]] = {}
    for path in paths:
        by_folder.setdefault(path.parent, []).append(path.name)
    return [
        str(folder / names[0]) if len(names) == 1 else f"{folder}/: {', '.join(names)}"
        for folder, names in by_folder.items()
    ]


# --------------------------------------------------------------------------- writers
_MD_SPECIAL = re.compile(r"([\\`*\[\]<>&$])")


def _md_text(text: str) -> str:
    """``text`` as Markdown shows it literally: backslash-escaped where it could start markup,
    an HTML tag, an entity or math (``<script>`` is shown, never run)."""
    return _MD_SPECIAL.sub(r"\\\1", text)


def _md_cell(text: str) -> str:
    return _md_text(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block]) -> str:
    """GitHub-flavoured Markdown; images are linked as files next to the report. Text from the
    inputs is escaped (:func:`_md_text`)."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {_md_text(block.text)}")
        elif isinstance(block, Paragraph):
            out.append(_md_text(block.text))
        elif isinstance(block, Bullets):
            out.append("\n".join(f"- {_md_text(item)}" for item in block.items))
        elif isinstance(block, TableBlock):
            header, rows = block.table
            lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |"]
            lines.append("|" + "|".join(" --- " for _ in header) + "|")
            for row in rows:
                cells = [_md_cell(c) for c in row]
                if block.status_column is not None and row[block.status_column] == "not met":
                    cells[block.status_column] = "**NOT MET**"
                lines.append("| " + " | ".join(cells) + " |")
            out.append("\n".join(lines))
        elif isinstance(block, Image):
            out.append(f"![{_md_text(block.alt)}]({block.file})")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f2f2f2; }
td.met { color: #176c2b; font-weight: 600; }
td.not-met { color: #b00020; font-weight: 700; }
td.not-measured { color: #8a6d00; }
td.tie { color: inherit; }
img { max-width: 100%; }
"""


def to_html(blocks: list[Block], images: dict[str, bytes]) -> str:
    """One self-contained HTML page: inline CSS, PNGs embedded as base64 data URIs."""
    esc = html.escape
    title = next((b.text for b in blocks if isinstance(b, Heading)), "distiq report")
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{esc(block.text)}</p>")
        elif isinstance(block, Bullets):
            body.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, TableBlock):
            header, rows = block.table
            parts = ["<table>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
            for row in rows:
                cells = []
                for index, cell in enumerate(row):
                    css = ""
                    if index == block.status_column:
                        css = f' class="{cell.replace(" ", "-")}"'
                    cells.append(f"<td{css}>{esc(cell)}</td>")
                parts.append("<tr>" + "".join(cells) + "</tr>")
            parts.append("</table>")
            body.append("\n".join(parts))
        elif isinstance(block, Image):
            data = base64.b64encode(images[block.file]).decode("ascii")
            body.append(f'<p><img alt="{esc(block.alt)}" src="data:image/png;base64,{data}"></p>')
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def render(inputs: ReportInputs, goals: Sequence[Goal] = DEFAULT_GOALS) -> RenderedReport:
    """Render ``inputs`` in memory (nothing is written), checking ``goals``."""
    blocks, images, checks = build_blocks(inputs, goals)
    return RenderedReport(to_markdown(blocks), to_html(blocks, images), images, checks)


def check_writable(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` if needed and check that the report can be written there (an ``OSError``
    naming the path and the ``--out`` fix otherwise)."""
    return config.check_writable(out_dir, "the report", "choose a writable directory with --out")


def write_report(
    inputs: ReportInputs, out_dir: str | os.PathLike, goals: Sequence[Goal] = DEFAULT_GOALS
) -> ReportFiles:
    """Render ``inputs`` (checking ``goals``) and write ``report.md``, ``report.html`` and the
    PNGs into ``out_dir`` (created if needed), each file atomically."""
    out = check_writable(out_dir)
    rendered = render(inputs, goals)
    image_paths = [atomic_write(out / name, png) for name, png in rendered.images.items()]
    markdown = atomic_write(out / REPORT_MD, rendered.markdown)
    page = atomic_write(out / REPORT_HTML, rendered.html)
    logger.info("wrote %s and %s (%d images)", markdown, page, len(image_paths))
    return ReportFiles(markdown=markdown, html=page, images=image_paths, goals=rendered.goals)


def report(
    paths: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    goals: Sequence[Goal] = DEFAULT_GOALS,
) -> ReportFiles:
    """``distiq report``: collect the records and run metrics under ``paths`` and write the report
    (checking ``goals``) into ``out_dir``. Inputs are read first (a bad input creates nothing),
    then the output directory is checked before anything is drawn."""
    return write_report(collect_inputs(paths), out_dir, goals)
