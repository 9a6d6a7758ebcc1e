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
    "test_reliability.py": "faults for real: SIGKILL mid-write, full tmpfs, DDP, each in a subprocess",
    "test_examples.py": "the examples as a user runs them, in subprocesses",
    "lightning/test_distributed.py": "two processes per test (gloo), Lightning launching the ranks",
    "lightning/test_sharding.py": "FSDP2 on two processes (gloo), each rank measured by the profiler",
    "lightning/test_planning.py": "a fit per case, one step measured by the profiler",
    "lightning/test_fake_module.py": "fits with and without the callback, a 200 MB memmap",
}
SLOW_TESTS = {  # "path::test name" (every parametrization) -> why
    "snapshots/test_reader.py::test_a_long_series_reads_under_a_low_open_files_limit": "300 files, a subprocess",
    "snapshots/test_schedule.py::test_projection_equals_the_files_the_rule_makes": "writes every file the rule makes",
    "lightning/test_tracing.py::test_analytic_forecast_within_3_percent_of_the_trace_for_every_preset": "GPT-2 XL",
    "lightning/test_callback.py::test_manual_optimization_with_two_optimizers": "several fits per case",
    "cli/test_plan_model.py::test_the_largest_micro_batch_named_fits_and_the_next_does_not": "three plans of a "
    "33,278-word Transformer, each tracing the sizes it names",
    "lightning/test_callback.py::test_downsample_picks_smallest_fitting_interval_and_says_so": "several fits",
    "lightning/test_callback.py::test_llama_style_untied_head_of_any_name": "a traced Llama-style fit per name",
    "lightning/test_callback.py::test_gradient_accumulation_counts_optimizer_steps": "several fits",
    "lightning/test_callback.py::test_snapshot_of_step_s_is_w_after_step_s_with_a_slow_writer_and_a_fast_model": "",
    "lightning/test_callback.py::test_untraceable_module_still_runs_and_says_so": "a trace that fails slowly",
    "lightning/test_session.py::test_two_fits_on_one_directory_at_the_same_time": "two fits in two processes",
    "lightning/test_inputs.py::test_final_step_and_steps_per_batch": "a fit per case",
    "forecast/test_checkpoint.py::test_checkpoint_forecast_within_one_percent": "writes real checkpoints",
    "lightning/test_tracing.py::test_trace_equals_a_real_lightning_step": "a fit per case, measured by the profiler",
    "lightning/test_tracing.py::test_trace_rebuilds_the_optimizer_the_run_configures": "a fit per optimizer",
    "lightning/test_tracing.py::test_trace_of_manual_optimization_with_two_optimizers": "a fit",
    "lightning/test_blocks.py::test_the_fit_start_measurement_extrapolates_and_equals_the_whole_trace": "traces",
}
COMPILED_MODULES = {"lightning/test_tracing_compiled.py"}
COMPILED_TESTS = {"lightning/test_found_by_users.py::test_a_compiled_module_compiles_as_it_would_without_the_callback",
                  "lightning/test_blocks.py::test_compiled_the_line_through_one_and_two_blocks_is_the_whole_model"}


def pytest_collection_modifyitems(config, items):
    root = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        path = os.path.relpath(str(item.fspath), root).replace(os.sep, "/")
        if path in COMPILED_MODULES or f"{path}::{item.originalname}" in COMPILED_TESTS:
            item.add_marker(pytest.mark.compiled)
            item.add_marker(pytest.mark.slow)
        if path in SLOW_MODULES or f"{path}::{item.originalname}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
