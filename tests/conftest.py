"""Shared test set-up: W&B never reaches the network from a test; tests/ is importable (helpers); the markers.

``slow`` marks what `pytest -m "not slow"` leaves out (the README's fast part): the modules in SLOW_MODULES,
whole, and the tests in SLOW_TESTS, each measured at several seconds or more on a quiet 2-core machine.
``compiled`` marks the compiled-forecast tests, which CI also runs on the oldest declared pins."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")


import json  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def record(request):
    """Write a test's measured facts to $BUDGET_RELIABILITY_REPORT (JSON lines) for RELIABILITY.md."""
    target = os.environ.get("BUDGET_RELIABILITY_REPORT")

    def write(**facts):
        if target:
            with open(target, "a") as fh:
                fh.write(json.dumps({"test": request.node.name, **facts}) + "\n")

    return write


SLOW_MODULES = {  # path under tests/ -> why
}
SLOW_TESTS = {  # "path::test name" (every parametrization) -> why
}
COMPILED_MODULES = {"lightning/test_tracing_compiled.py"}


def pytest_collection_modifyitems(config, items):
    root = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        path = os.path.relpath(str(item.fspath), root).replace(os.sep, "/")
        if path in COMPILED_MODULES:
            item.add_marker(pytest.mark.compiled)
            item.add_marker(pytest.mark.slow)
        if path in SLOW_MODULES or f"{path}::{item.originalname}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
