"""Makes the shared toys (train_toys.py) available as the ``toys`` fixture."""

import importlib.util
import sys
from pathlib import Path

import pytest


def _load_toys():
    name = "distiq_train_test_toys"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("train_toys.py")
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def toys():
    return _load_toys()
