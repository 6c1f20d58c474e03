"""Shared test models: the tiny edge VLM and its data (deploy_toys.py, the ``deploy`` fixture)
and run directories of every VLM family (family_runs.py, the ``families`` fixture)."""

import importlib.util
import sys
from pathlib import Path

import pytest


def _load(file: str, name: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(file))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def load_toys():
    return _load("deploy_toys.py", "distiq_deploy_test_toys")


@pytest.fixture(scope="session")
def deploy():
    return load_toys()


class Families:
    """``make_run(family, name, schemes)`` under one session folder (base models cached)."""

    def __init__(self, root: Path) -> None:
        self.module = _load("family_runs.py", "distiq_family_test_runs")
        self.root = root
        self.names = self.module.FAMILIES

    def make_run(self, family: str, name: str, schemes: dict):
        return self.module.make_run(family, self.root, f"{family}-{name}", schemes)


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    return Families(tmp_path_factory.mktemp("family-runs"))
