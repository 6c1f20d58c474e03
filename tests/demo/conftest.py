"""The report input builders of tests/report (report_fixtures.py) as the ``fixtures`` fixture,
and a CliRunner."""

import importlib.util
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner


@pytest.fixture(scope="session")
def fixtures():
    name = "distiq_report_test_fixtures"
    if name not in sys.modules:
        path = Path(__file__).parents[1] / "report" / "report_fixtures.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def runner():
    return CliRunner()
