"""Shared test set-up: W&B never reaches the network from a test; tests/ is importable (helpers)."""

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
