"""The ``distiq`` command line: ``distiq demo | teacher | compress | eval | export | bench | report``.

Each verb lives in its own module under ``distiq.cli`` (``demo``, ``teacher``, ``compress``,
``evaluate``, ``export``, ``bench``, ``report``); this module only assembles the app. Verb modules
import typer and the standard library only; torch and every other heavy backend are imported
inside the verbs, so ``distiq --help`` is fast. Library code logs; the CLI talks to people through
rich. Exit codes: 0 success, 1 user error (one message, no traceback), 2 usage error or verb not
available yet, 130 interrupted.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from distiq import __version__
from distiq.cli import bench, compress, demo, evaluate, export, report, teacher

app = typer.Typer(
    name="distiq",
    help="Quantization-aware distillation of vision-language and vision models for edge devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (a rich progress bar
    redirects it to print above the bar; test runners replace it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # StreamHandler.__init__ assigns it
        pass


def setup_logging(verbosity: int) -> None:
    """Log to stderr: warnings only by default (people get progress bars and tables), distiq's
    INFO messages with ``-v``, DEBUG with ``-vv`` (other libraries' INFO too). Calling it again
    replaces the handler it installed."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)
    root.addHandler(_StderrHandler())
    root.setLevel(logging.INFO if verbosity >= 2 else logging.WARNING)
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.getLogger("distiq").setLevel(level)
    if verbosity == 0:  # Hugging Face's own tqdm bars (loading / writing weights) would
        # interleave with ours; read when huggingface_hub is first imported (lazily, later)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"distiq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: int = typer.Option(
        0, "--verbose", "-v", count=True, help="Log progress messages (-v) or debug ones (-vv)."
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    setup_logging(verbose)


app.command("demo")(demo.command)
app.command("teacher")(teacher.command)
app.command("compress")(compress.command)
app.command("eval")(evaluate.command)
app.command("export")(export.command)
app.command("bench")(bench.command)
app.command("report")(report.command)


# OpenMP threads that wait by spinning (libgomp's default, ACTIVE) make a tiny model's training
# many times slower as soon as another process competes for the cores. PASSIVE waiters sleep
# instead. It has to be in the environment before torch loads OpenMP, which no verb does before
# main() runs.
OMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def main() -> None:
    for key, value in OMP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    app()
