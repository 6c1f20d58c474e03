"""The ``distiq`` command line: ``distiq demo | teacher | compress | eval | export | bench | report``.

Each verb lives in its own module under ``distiq.cli``; this module only assembles the app.
Library code logs; the CLI talks to people through rich.
"""

from __future__ import annotations

import logging

import typer

from distiq import __version__

app = typer.Typer(
    name="distiq",
    help="Quantization-aware distillation of vision-language and vision models for edge devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"distiq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )


def _not_yet(verb: str) -> None:
    typer.secho(
        f"`distiq {verb}` is not available yet in distiq {__version__}: the compression engine "
        "(training loop, recipes, demo) is still being built. Use the Python API "
        "(distiq.quant, distiq.ptq) meanwhile.",
        err=True,
        fg="yellow",
    )
    raise typer.Exit(code=2)


@app.command()
def demo(
    quick: bool = typer.Option(False, "--quick", help="A small, fast version (about 2 minutes)."),
    out: str = typer.Option("distiq-demo", "--out", help="Output directory."),
) -> None:
    """Run the embedded default end to end, offline: data, teacher, compression, report."""
    _not_yet("demo")


def main() -> None:
    app()
