"""The package as a whole: old import paths that users were shown still work, and nothing of ours uses them."""

import re
from pathlib import Path

import budget_callback.forecast.shapes
import budget_callback.models.gpt

ROOT = Path(__file__).resolve().parents[1]


def test_old_import_paths_are_the_same_objects():
    """`budget_callback.gpt.GPT` was the documented reference model and `budget_callback.shapes` its presets."""
    from budget_callback import gpt, shapes

    assert gpt.GPT is budget_callback.models.gpt.GPT
    assert shapes.preset is budget_callback.forecast.shapes.preset and shapes.PRESETS is \
        budget_callback.forecast.shapes.PRESETS


def test_the_package_tests_examples_and_benchmarks_use_the_real_paths():
    """The shims are for users' old code only: our own code imports where things live."""
    old = re.compile(r"^\s*(from budget_callback(\.gpt|\.shapes|\.storage)\b|from budget_callback import .*\b(gpt|shapes|"
                     r"storage)\b|import budget_callback\.(gpt|shapes|storage)\b)",
                     re.MULTILINE)
    shims = {ROOT / "budget_callback" / "gpt.py", ROOT / "budget_callback" / "shapes.py"}
    users = [p for folder in ("budget_callback", "tests", "examples", "benchmarks") for p in (ROOT / folder).rglob("*.py")
             if p not in shims and p != Path(__file__).resolve()]
    assert [str(p.relative_to(ROOT)) for p in users if old.search(p.read_text())] == []
