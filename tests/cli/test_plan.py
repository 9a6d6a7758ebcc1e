import json
import os
import subprocess
import sys

import pytest

from budget_callback.cli import main
from budget_callback.snapshots.format import MAX_SNAPSHOTS_PER_FILE

REQUIRED = [
    "params.total", "memory.peak_bytes", "memory.params_bytes", "memory.gradients_bytes", "memory.optimizer_bytes",
    "memory.activations_bytes", "memory.max_batch_size", "memory.min_devices", "flops.train_per_step",
    "time.train_seconds", "storage.snapshot_count", "storage.snapshot_bytes", "storage.per_1000_steps_bytes",
    "storage.checkpoint_bytes", "storage.total_bytes", "storage.host_buffer_bytes", "wandb.metric_points",
    "wandb.total_bytes", "save_every_n_steps",
]


def _plan(capsys, *args):
    code = main(["plan", *args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def _get(d, dotted):
    for part in dotted.split("."):
        d = d[part]
    return d


def test_json_has_contract_keys_and_integers(capsys):
    code, d = _plan(capsys, "--preset", "gpt2-xl", "--gpu", "h100", "--devices", "8", "--strategy", "fsdp",
                    "--batch-size", "4", "--steps", "2000")
    assert code == 0
    for key in REQUIRED:
        value = _get(d, key)
        if key.endswith("bytes") or key.startswith("flops") or key.endswith("count") or key.endswith("points"):
            assert isinstance(value, int) and not isinstance(value, bool), key
    assert d["params"]["total"] == 1_557_611_200
    assert isinstance(d["time"]["train_seconds"], float) and d["time"]["train_seconds"] > 0
    assert d["time"]["peak_flops_per_device"] == 989_400_000_000_000  # FLOP figures are integers
    assert isinstance(d["memory"]["max_batch_size"], int) and d["memory"]["min_devices"] >= 1


def test_time_is_null_without_gpu(capsys):
    _, d = _plan(capsys, "--preset", "gpt2-tiny")
    assert d["time"]["train_seconds"] is None and d["memory"]["max_batch_size"] is None


def test_data_rate_calculator_case(capsys):
    _, d = _plan(capsys, "--vocab-size", "10000", "--d-model", "64", "--n-layer", "2", "--n-head", "2",
                 "--steps", "10000", "--save-every", "1", "--snapshot-dtype", "bfloat16")
    assert d["storage"]["snapshot_count"] == 10_000
    assert round(d["storage"]["snapshot_bytes"] / 2**30, 2) == 11.92
    assert round(d["storage"]["snapshot_file_bytes"] / 2**20, 2) == 1.22


def test_disk_budget_downsamples(capsys):
    _, d = _plan(capsys, "--preset", "gpt2-tiny", "--steps", "10000", "--disk-budget", "1GB")
    assert d["save_every_n_steps"] > 1 and d["decision"] == "downsampled"
    assert d["storage"]["snapshot_bytes"] <= 10**9
    _, d = _plan(capsys, "--preset", "gpt2-tiny", "--steps", "10000", "--disk-budget", "1GB", "--on-exceed", "abort")
    assert d["save_every_n_steps"] == 1 and d["decision"] == "abort"


def test_memory_budget_abort_names_largest_batch(capsys):
    _, d = _plan(capsys, "--preset", "gpt2", "--batch-size", "64", "--memory-budget", "24GiB")
    assert d["decision"] == "abort"
    assert not d["budgets"]["memory"]["fits"]
    assert any("largest micro-batch" in a for a in d["budgets"]["memory"]["advice"])


def test_human_report_lists_sections(capsys):
    assert main(["plan", "--preset", "gpt2-xl", "--gpu", "h100", "--devices", "8", "--strategy", "fsdp"]) == 0
    out = capsys.readouterr().out
    for section in ("Parameters", "Memory per device", "FLOPs", "Time on 8 x h100", "Storage", "Weights & Biases", "Budgets"):
        assert section in out
    assert "1,557,611,200" in out


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--preset", "gpt5"], "--preset"),
        (["--preset", "gpt2", "--n-head", "7"], "--n-head"),
        (["--vocab-size", "100", "--d-model", "64"], "--n-layer"),
        (["--preset", "gpt2", "--steps", "0"], "--steps"),
        (["--preset", "gpt2", "--batch-size", "-4"], "--batch-size"),
        (["--preset", "gpt2", "--disk-budget", "12XB"], "--disk-budget"),
        (["--preset", "gpt2", "--memory-budget", "0GB"], "--memory-budget"),
        (["--preset", "gpt2", "--precision", "fp8"], "--precision"),
        (["--preset", "gpt2", "--mfu", "1.5"], "--mfu"),
        (["--preset", "gpt2", "--gpu", "tpu"], "--gpu"),
        (["--preset", "gpt2", "--strategy", "horovod"], "--strategy"),
        (["--preset", "gpt2", "--seq-len", "2048"], "--seq-len"),
        (["--preset", "gpt2", "--save-every", "0"], "--save-every"),
        (["--preset", "gpt2", "--snapshot-dtype", "int8"], "--snapshot-dtype"),
        (["--preset", "gpt2", "--disk-budget", "9" * 400 + "GB"], "--disk-budget"),  # OverflowError before
        (["--preset", "gpt2", "--wandb-budget", "1e400"], "--wandb-budget"),
        (["--preset", "gpt2", "--snapshots-per-file", "2000000"], "--snapshots-per-file"),  # the callback's limit
        (["--preset", "gpt2", "--disk-budget", "\u0661\u0662"], "--disk-budget"),  # int() took these digits
        (["--preset", "llama-3-8b", "--compile"], "--compile"),  # the compiled model is for GPT-2-style blocks
        (["--preset", "gpt2", "--compile", "--strategy", "fsdp"], "--compile"),
        (["--preset", "gpt2", "--optimizer", "sgd", "--momentum", "nan", "--json"], "--momentum"),  # printed NaN
        (["--preset", "gpt2", "--optimizer", "sgd", "--momentum", "-1"], "--momentum"),  # exited 0
    ],
)
def test_bad_input_exits_2_with_one_line(args, flag):
    proc = subprocess.run([sys.executable, "-m", "budget_callback", "plan", *args], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in proc.stderr


def test_huge_runs_answer_exactly(capsys):
    """`--steps 10**21 --save-every 3 --disk-budget 999TB` scanned intervals one by one for minutes."""
    from budget_callback.snapshots.format import SnapshotLayout
    from budget_callback.snapshots.schedule import series_bytes

    _, d = _plan(capsys, "--preset", "gpt2", "--steps", str(10**21), "--save-every", "3", "--disk-budget", "999TB")
    k, layout = d["save_every_n_steps"], SnapshotLayout(50_257, 768, "bfloat16")
    assert d["decision"] == "downsampled" and d["storage"]["snapshot_bytes"] == series_bytes(layout, 10**21, k)
    assert series_bytes(layout, 10**21, k) <= 999 * 10**12 < series_bytes(layout, 10**21, k - 1)


def test_plan_imports_neither_lightning_nor_torch():
    code = ("import sys; from budget_callback.cli import main; main(['plan', '--preset', 'gpt2', '--json']); "
            "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning')], file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stderr.strip() == "[]"


def test_console_script_and_module_agree():
    proc = subprocess.run([sys.executable, "-m", "budget_callback", "plan", "--preset", "gpt2-tiny", "--json"],
                          capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout)["params"]["total"] == 756_480


def test_readme_gpt2_xl_output_is_current(capsys):
    """The README shows the plan's real output for examples/plan_gpt2_xl.sh."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    marker = "GPT-2 XL on eight H100s (the output of the third command above):\n\n```\n"
    shown = readme[readme.index(marker) + len(marker):].split("```")[0]
    main(["plan", "--preset", "gpt2-xl", "--gpu", "h100", "--devices", "8", "--strategy", "fsdp", "--batch-size", "8",
          "--steps", "20000", "--save-every", "10", "--checkpoint-every", "1000"])
    assert capsys.readouterr().out == shown


def _plan_accepts(flag, text):
    try:
        return main(["plan", "--preset", "gpt2-tiny", "--steps", "100", flag, text, "--json"]) == 0
    except SystemExit as exit_:
        assert exit_.code == 2
        return False


def _callback_accepts(tmp_path, argument, value):
    from budget_callback import BudgetCallback

    try:
        BudgetCallback(tmp_path / "s", **{argument: value})
        return True
    except ValueError:
        return False


_SIZES = ["1", "0", "0.5", "1.5KiB", "500MB", "12GiB", "1e3", "\u0663", "1_000", " 5GB ", "9" * 30, "-1GB", "0x10"]
_COUNTS = ["1", "0", "-1", "3", str(MAX_SNAPSHOTS_PER_FILE), str(MAX_SNAPSHOTS_PER_FILE + 1), "2000000", "9" * 20]


@pytest.mark.parametrize("flag, argument, values, typed", [
    ("--save-every", "save_every_n_steps", _COUNTS, int),
    ("--snapshots-per-file", "snapshots_per_file", _COUNTS, int),
    ("--snapshot-dtype", "snapshot_dtype", ["float32", "bfloat16", "float16", "int8", "float64", "BF16"], str),
    ("--on-exceed", "on_exceed", ["downsample", "abort", "warn", "stop", "Abort"], str),
    ("--disk-budget", "disk_budget", _SIZES, str),
    ("--memory-budget", "memory_budget", _SIZES, str),
    ("--wandb-budget", "wandb_budget", _SIZES, str),
])
def test_plan_refuses_what_the_callback_refuses(tmp_path, capsys, flag, argument, values, typed):
    """The plan forecasts a run the callback would start, so both take the same values of the flags they share
    (`--snapshots-per-file 2000000` forecast happily; the callback refuses more than 1,048,576)."""
    got = {v: (_plan_accepts(flag, v), _callback_accepts(tmp_path, argument, typed(v))) for v in values}
    capsys.readouterr()
    assert {v: plan for v, (plan, _) in got.items()} == {v: callback for v, (_, callback) in got.items()}


def test_snapshots_per_file_over_the_limit_names_the_flag_and_the_limit():
    proc = subprocess.run([sys.executable, "-m", "budget_callback", "plan", "--preset", "gpt2",
                           "--snapshots-per-file", str(MAX_SNAPSHOTS_PER_FILE + 1)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "budget-callback: error: argument --snapshots-per-file: must be at most 1,048,576 (one file holds them "
        "all in host RAM while it fills), got '1048577'"]


@pytest.mark.parametrize("args", [["--json"], [], ["--gpu", "h100", "--check"]])
def test_a_closed_stdout_ends_quietly_with_status_1(args):
    """`budget-callback plan --json | head -c 100` printed a BrokenPipeError traceback. The pipe here has no
    reader from the start, so every write fails the way it does once `head` has exited."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "budget_callback", "plan", "--preset", "llama-3-8b", *args],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.stderr == "" and proc.returncode == 1


@pytest.mark.parametrize("batch,keep_logits,traced_mib", [(1, False, 2561.8), (1, True, 2561.8), (4, False, 3846.8),
                                                          (4, True, 4157.3)])
def test_compiled_gpt2_small_is_the_compiled_trace(capsys, batch, keep_logits, traced_mib):
    """GPT-2 small, T=1,024, bf16-mixed, fused AdamW: `--compile` against compiled traces of the reference GPT
    in Lightning's step order (tests/lightning/test_tracing_compiled.py checks smaller ones live; these take
    1-3 minutes each here). The previous step's gradients (475 MiB) are alive through the forward, whose end is
    the peak but at B=4 with the logits returned. nanoGPT's own loop frees them after its step: its measured
    compiled step (2,284 MiB at V=50,304, B=1, logits returned) is this model's backward start, 2,283.4 MiB."""
    args = ["--preset", "gpt2", "--batch-size", str(batch), "--optimizer-impl", "fused"] + (
        ["--keep-logits"] if keep_logits else [])
    _, eager = _plan(capsys, *args)
    _, compiled = _plan(capsys, *args, "--compile")
    assert compiled["memory"]["mode"] == "compiled" and eager["memory"]["mode"] == "eager"
    assert compiled["memory"]["peak_bytes"] / 2**20 == pytest.approx(traced_mib, rel=0.005)
    assert compiled["memory"]["peak_bytes"] < 0.9 * eager["memory"]["peak_bytes"]
    assert compiled["memory"]["max_batch_size"] is None  # no memory budget given
    code, fits = _plan(capsys, *args, "--compile", "--gpu", "h100", "--memory-budget", "80GB")
    _, eager_fits = _plan(capsys, *args, "--gpu", "h100", "--memory-budget", "80GB")
    assert code == 0 and fits["memory"]["max_batch_size"] > eager_fits["memory"]["max_batch_size"] > 0


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "budget_callback", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [[], ["plan"], ["plan", "--preset", "gpt5"], ["plan", "--preset", "gpt2", "--n-head", "7"],
                                  ["report"]])
def test_every_error_has_one_prefix(args):
    """The command's own errors said `budget-callback: error:`, the plan's `budget-callback plan: error:`."""
    proc = _cli(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("budget-callback: error: "), proc.stderr


def test_help_shows_the_defaults():
    """`plan --help` showed no defaults; a newcomer could not tell what a plan without flags assumes."""
    proc = _cli("plan", "--help")
    assert proc.returncode == 0
    helps, flag = {}, None  # option -> its help text (argparse wraps it over lines)
    for line in proc.stdout[proc.stdout.index("options:"):].splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            helps[flag] = line
        elif flag is not None:
            helps[flag] += " " + line.strip()
    for flag, default in [("--steps", "1000"), ("--batch-size", "1"), ("--precision", "bf16-mixed"),
                          ("--optimizer", "adamw"), ("--strategy", "ddp"), ("--save-every", "1"),
                          ("--snapshot-dtype", "bfloat16"), ("--log-every-n-steps", "50"), ("--mfu", "0.4"),
                          ("--on-exceed", "downsample"), ("--flash-attention", "True"), ("--momentum", "0.0")]:
        assert f"(default: {default})" in " ".join(helps[flag].split()), helps[flag]


def test_version_is_the_installed_package_version():
    """`__version__` said 0.2.0 while pyproject.toml (and pip) said 0.1.0; now pyproject reads it from the package."""
    import importlib.metadata

    import budget_callback

    proc = _cli("--version")
    assert proc.returncode == 0
    assert proc.stdout == f"budget-callback {budget_callback.__version__}\n"
    assert budget_callback.__version__ == importlib.metadata.version("budget-callback")
