"""The tiny models of tests/export (deploy_toys.py) as the ``deploy`` fixture."""

import importlib.util
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def deploy():
    name = "distiq_deploy_test_toys"
    if name not in sys.modules:
        path = Path(__file__).parents[1] / "export" / "deploy_toys.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
