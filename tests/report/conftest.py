"""Loads the shared input builders (report_fixtures.py) as the ``fixtures`` fixture."""

import importlib.util
import sys
from pathlib import Path

import pytest


def load_report_fixtures():
    name = "distiq_report_test_fixtures"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("report_fixtures.py")
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def fixtures():
    return load_report_fixtures()
