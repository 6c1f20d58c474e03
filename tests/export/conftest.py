"""Loads the shared tiny models (deploy_toys.py) as the ``deploy`` fixture."""

import importlib.util
import sys
from pathlib import Path

import pytest


def load_toys():
    name = "distiq_deploy_test_toys"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("deploy_toys.py")
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def deploy():
    return load_toys()
