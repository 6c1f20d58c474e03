"""``distiq demo``: the embedded default end to end, offline (data, teacher, compression,
evaluation, export, bench, report)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from distiq.cli._common import not_available, user_errors


@user_errors
def command(
    quick: Annotated[
        bool, typer.Option("--quick", help="A small, fast version (about 2 minutes).")
    ] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path(
        "distiq-demo"
    ),
) -> None:
    """Run the embedded default end to end, offline: data, teacher, compression, report."""
    not_available(
        "demo",
        "it needs the compression engine (distiq.train: compress, evaluate), export and bench, "
        "which are still being built",
    )
