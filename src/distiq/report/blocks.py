"""The blocks a report is made of (headings, paragraphs, bullet lists, tables, images), written
by the Markdown and the HTML writers of :mod:`distiq.report.render` alike."""

from __future__ import annotations

from dataclasses import dataclass

from distiq.report.tables import Table


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class TableBlock:
    table: Table
    status_column: int | None = None  # cells "not met" are highlighted, each status a class


@dataclass(frozen=True)
class Image:
    file: str
    alt: str


Block = Heading | Paragraph | Bullets | TableBlock | Image
