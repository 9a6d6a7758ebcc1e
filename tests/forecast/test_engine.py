"""The forecast engine: arguments checked up front; capture bytes; storage parts that add up and match the
snapshot format, the schedule and a real module's tensors; the budget policy's decision and interval; run time
from the GPU table. Plain values in, plain values out (no Trainer, no disk)."""

import json

import pytest
import torch

from budget_callback.forecast.checkpoint import checkpoint_bytes
from budget_callback.forecast.engine import Budgets, PlanInputs, SnapshotSpec, forecast
from budget_callback.forecast.gpus import gpu
from budget_callback.forecast.memory import TrainSetup
from budget_callback.forecast.shapes import ModelShape, preset
from budget_callback.forecast.wandb_usage import LoggingSpec, wandb_usage
from budget_callback.models.gpt import GPT
from budget_callback.snapshots.format import SnapshotLayout, host_buffer_bytes
from budget_callback.snapshots.schedule import Schedule, series_bytes

TINY = preset("gpt2-tiny")  # V=10,000, D=64, tied
UNTIED = ModelShape(vocab_size=500, d_model=32, n_layer=1, n_head=2, n_ctx=64, tied=False)
NO_CKPT = LoggingSpec(console=None)


def _inputs(shape=TINY, steps=1000, every=1, logging=NO_CKPT, **kwargs) -> PlanInputs:
    snapshot = kwargs.pop("snapshot", SnapshotSpec(save_every_n_steps=every))
    return PlanInputs(shape, steps=steps, snapshot=snapshot, logging=logging, **kwargs)


# --------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("make, message", [
    (lambda: SnapshotSpec(save_every_n_steps=0), "`save_every_n_steps` must be a positive integer, got 0"),
    (lambda: SnapshotSpec(queue_depth=-1), "`queue_depth` must be a positive integer, got -1"),
    (lambda: Budgets(on_exceed="explode"), "`on_exceed` must be one of downsample, abort, warn, got 'explode'"),
    (lambda: _inputs(steps=0), "`steps` must be a positive integer, got 0"),
    (lambda: _inputs(steps_per_batch=0), "`steps_per_batch` must be a positive integer, got 0"),
    (lambda: _inputs(setup=TrainSetup(seq_len=257)),
     r"`seq_len` \(257\) exceeds the learned position table `n_ctx` \(256\)"),
    (lambda: _inputs(mfu=0), r"`mfu` must be in \(0, 1\], got 0"),
    (lambda: _inputs(mfu=1.01), r"`mfu` must be in \(0, 1\], got 1.01"),
    (lambda: _inputs(gpu="v100"), "`gpu` must be one of"),
])
def test_bad_arguments_are_refused_naming_them(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_rotary_positions_take_any_sequence_length_and_mfu_1_is_allowed():
    shape = preset("llama-3-8b", n_layer=1)
    assert _inputs(shape, setup=TrainSetup(seq_len=shape.n_ctx * 4), mfu=1.0).setup.seq_len == 4 * 8192


def test_snapshot_spec_layout_takes_the_shape_and_its_tying():
    spec = SnapshotSpec(dtype="float32", snapshots_per_file=4, include_embedding=True)
    assert spec.layout(UNTIED) == SnapshotLayout(500, 32, "float32", 4, True, False)
    assert spec.layout(TINY) == SnapshotLayout(10_000, 64, "float32", 4, True, True)
    assert spec.layout(TINY).names == ("unembedding",)  # tied: E is W, stored once


# --------------------------------------------------------------------------- capture bytes

V_D = 500 * 32


@pytest.mark.parametrize("strategy, prec, dtype, embedding, expected", [
    ("ddp", "32-true", "bfloat16", False, V_D * 2),  # a cast into bf16: one bf16 copy of W
    ("ddp", "bf16-mixed", "bfloat16", False, V_D * 2),  # parameters are fp32 under -mixed
    ("ddp", "32-true", "float32", False, 0),  # same dtype, not sharded: copied straight to the host
    ("ddp", "bf16-true", "bfloat16", False, 0),
    ("ddp", "32-true", "bfloat16", True, 2 * V_D * 2),  # W and E (untied)
    ("deepspeed_stage_2", "32-true", "float32", False, 0),  # ZeRO-2 does not shard parameters
    ("fsdp", "32-true", "float32", False, V_D * (4 + 4)),  # gathered whole, then copied
    ("deepspeed_stage_3", "bf16-true", "bfloat16", False, V_D * (2 + 2)),
    ("fsdp", "bf16-mixed", "bfloat16", True, 2 * V_D * (4 + 2)),
])
def test_capture_bytes(strategy, prec, dtype, embedding, expected):
    inputs = _inputs(UNTIED, setup=TrainSetup(strategy=strategy, precision=prec),
                     snapshot=SnapshotSpec(dtype=dtype, include_embedding=embedding))
    assert inputs.capture_bytes() == expected


def test_capture_bytes_measured_on_the_device_wins():
    assert _inputs(UNTIED, capture_device_bytes=12_345, setup=TrainSetup(strategy="fsdp")).capture_bytes() == 12_345


# --------------------------------------------------------------------------- storage

@pytest.mark.parametrize("every, per_file, dtype, steps", [
    (1, 1, "bfloat16", 1000), (10, 1, "float32", 1000), (7, 4, "bfloat16", 999), (3, 16, "float16", 100),
])
def test_snapshot_storage_is_the_formats_exact_bytes(every, per_file, dtype, steps):
    snap = SnapshotSpec(save_every_n_steps=every, dtype=dtype, snapshots_per_file=per_file)
    f = forecast(_inputs(steps=steps, snapshot=snap))
    layout = SnapshotLayout(10_000, 64, dtype, per_file, False, True)
    s = f.storage
    assert s["snapshot_bytes"] == series_bytes(layout, steps, every) == s["total_bytes"]  # nothing else on disk
    assert s["snapshot_count"] == steps // every
    assert s["snapshot_files"] == -(-(steps // every) // per_file)
    assert s["snapshot_file_bytes"] == layout.file_bytes(every, min(per_file, steps // every), every)
    assert s["per_1000_steps_bytes"] == series_bytes(layout, 1000, every)
    assert s["host_buffer_bytes"] == host_buffer_bytes(layout, 4)
    assert s["checkpoint_bytes"] > 0 and s["checkpoints_kept"] == 0 and s["wandb_staging_bytes"] == 0


def test_the_snapshot_ring_is_capped_by_the_host_ram_and_says_why():
    """The cap is what the capture may hold (the callback's session passes the host RAM available at fit start;
    the CLI knows none), with its basis, in the JSON and on the report's line."""
    from budget_callback.forecast.report import render
    from budget_callback.snapshots.format import image_bytes
    from budget_callback.units import format_bytes

    layout = SnapshotLayout(10_000, 64, "bfloat16", 1, False, True)
    image = image_bytes(layout)
    s = forecast(_inputs(snapshot=SnapshotSpec(queue_depth=6))).storage
    assert (s["host_buffer_images"], s["host_buffer_bytes"], s["host_ram_available_bytes"]) == (8, 8 * image, None)
    f = forecast(_inputs(snapshot=SnapshotSpec(queue_depth=6, host_ram_bytes=16 * image + 5)))
    s = f.storage
    assert (s["host_buffer_images"], s["host_buffer_bytes"], s["host_ram_share"]) == (4, 4 * image, 0.25)
    assert s["host_buffer_basis"] == (f"4 file images: as many as fit in 25% of the {format_bytes(16 * image + 5)} "
                                      f"of host RAM available (queue_depth 6 + 2 would take {format_bytes(8 * image)})")
    line = next(x for x in render(f).splitlines() if "host RAM for the snapshot ring" in x)
    assert line.endswith(f"{format_bytes(4 * image)}  ({s['host_buffer_basis']})")
    assert json.loads(json.dumps(f.to_dict()))["storage"]["host_buffer_images"] == 4


@pytest.mark.parametrize("share", [True, False])
def test_checkpoints_and_wandb_staging_count_when_they_share_the_disk(share):
    logging = LoggingSpec(checkpoint_every_n_steps=100, keep_checkpoints=2, log_model="all", console=None)
    s = forecast(_inputs(every=10, logging=logging, checkpoints_share_disk=share)).storage
    assert s["checkpoints_kept"] == 2 and s["checkpoints_bytes"] == 2 * s["checkpoint_bytes"]
    assert s["wandb_staging_bytes"] == 10 * s["checkpoint_bytes"]  # log_model="all": every checkpoint written
    others = s["checkpoints_bytes"] + s["wandb_staging_bytes"] if share else 0
    assert s["total_bytes"] == s["snapshot_bytes"] + s["rewrite_headroom_bytes"] + others
    assert s["rewrite_headroom_bytes"] == 0  # one snapshot per file: nothing is rewritten


def test_a_stacked_file_rewritten_at_checkpoints_needs_headroom_for_its_copy():
    logging = LoggingSpec(checkpoint_every_n_steps=100, console=None)
    snap = SnapshotSpec(save_every_n_steps=5, snapshots_per_file=8)
    s = forecast(_inputs(snapshot=snap, logging=logging, checkpoints_share_disk=False)).storage
    layout = SnapshotLayout(10_000, 64, "bfloat16", 8, False, True)
    assert s["rewrite_headroom_bytes"] == layout.file_bytes(5, 8, 5)
    assert s["total_bytes"] == s["snapshot_bytes"] + layout.file_bytes(5, 8, 5)
    assert forecast(_inputs(snapshot=snap)).storage["rewrite_headroom_bytes"] == 0  # no checkpoints


@pytest.mark.parametrize("name, setup", [
    ("gpt2", TrainSetup()),
    ("llama-3-8b", TrainSetup(precision="bf16-true")),
    ("gemma-2b", TrainSetup(optimizer="sgd", momentum=0.9)),
])
def test_checkpoint_bytes_count_the_real_modules_tensors(name, setup):
    """The analytic tensor and state-dict counts are those of the module built from the shape (tied: one tensor,
    two state-dict keys)."""
    shape = preset(name)
    with torch.device("meta"):
        model = GPT(shape)
    params = list(model.parameters())
    expected = checkpoint_bytes(sum(p.numel() for p in params), len(params), setup.prec.param_bytes,
                                setup.optimizer, setup.momentum, len(model.state_dict()))
    assert forecast(_inputs(shape, setup=setup)).storage["checkpoint_bytes"] == expected


def test_a_resumed_series_keeps_its_interval_and_counts_what_is_written():
    layout = SnapshotLayout(10_000, 64, "bfloat16", 1, False, True)
    schedule = Schedule.start(layout, 5)
    for step in range(1, 101):
        schedule.advance(step)
    f = forecast(_inputs(steps=200, every=1, resume=schedule.state()))
    assert f.save_every_n_steps == 5 and f.decision == "fits"
    assert f.storage["snapshot_count"] == 40 and f.storage["snapshot_bytes"] == series_bytes(layout, 200, 5)


# --------------------------------------------------------------------------- budgets and the decision

def _fits(budget: int, every: int, steps: int = 1000) -> bool:
    return series_bytes(SnapshotLayout(10_000, 64, "bfloat16", 1, False, True), steps, every) <= budget


def test_no_budget_fits_at_the_requested_interval():
    f = forecast(_inputs(every=3))
    assert (f.decision, f.save_every_n_steps, f.fits) == ("fits", 3, True)
    assert f.verdicts["disk"].budget_bytes is None and not f.verdicts["disk"].checked


def test_a_budget_of_exactly_the_total_fits():
    total = forecast(_inputs()).storage["total_bytes"]
    f = forecast(_inputs(budgets=Budgets(disk_bytes=total)))
    assert (f.decision, f.save_every_n_steps) == ("fits", 1)
    assert forecast(_inputs(budgets=Budgets(disk_bytes=total - 1))).decision == "downsampled"


@pytest.mark.parametrize("budget", [500_000_000, 123_456_789, 20_000_000, 1_400_000])
def test_downsample_picks_the_smallest_interval_that_fits(budget):
    f = forecast(_inputs(budgets=Budgets(disk_bytes=budget)))
    every = f.save_every_n_steps
    assert f.decision == "downsampled" and every > 1 and f.verdicts["disk"].fits
    assert _fits(budget, every) and f.storage["snapshot_bytes"] <= budget
    assert not any(_fits(budget, k) for k in range(1, every))  # every smaller interval is over
    assert f.to_dict()["requested_save_every_n_steps"] == 1
    assert any(f"from 1 to {every}" in note for note in f.notes)


def test_abort_and_warn_keep_the_interval_and_advise_the_one_that_fits():
    budget = 123_456_789
    solved = forecast(_inputs(budgets=Budgets(disk_bytes=budget))).save_every_n_steps
    for policy in ("abort", "warn"):
        f = forecast(_inputs(budgets=Budgets(disk_bytes=budget, on_exceed=policy)))
        assert (f.decision, f.save_every_n_steps, f.fits) == (policy, 1, False)
        assert f.verdicts["disk"].advice[0] == f"raise save_every_n_steps from 1 to {solved}"


def test_when_not_even_one_snapshot_fits_downsample_aborts():
    file_bytes = SnapshotLayout(10_000, 64, "bfloat16", 1, False, True).file_bytes(1000, 1, 1000)
    f = forecast(_inputs(budgets=Budgets(disk_bytes=file_bytes - 1)))
    assert (f.decision, f.save_every_n_steps) == ("abort", 1)
    assert f.verdicts["disk"].advice[0].startswith("not even one snapshot fits")
    one = forecast(_inputs(budgets=Budgets(disk_bytes=file_bytes)))
    assert (one.decision, one.save_every_n_steps, one.storage["snapshot_count"]) == ("downsampled", 501, 1)


def test_free_disk_is_the_budget_only_when_none_is_set():
    f = forecast(_inputs(), free_disk_bytes=20_000_000)
    assert f.decision == "downsampled" and f.verdicts["disk"].budget_bytes == 20_000_000
    f = forecast(_inputs(budgets=Budgets(disk_bytes=10**12)), free_disk_bytes=20_000_000)
    assert f.decision == "fits" and f.verdicts["disk"].budget_bytes == 10**12


def test_checkpoints_on_the_same_disk_leave_less_room_for_snapshots():
    logging = LoggingSpec(checkpoint_every_n_steps=100, keep_checkpoints=3, console=None)
    alone = forecast(_inputs(budgets=Budgets(disk_bytes=60_000_000)))
    shared = forecast(_inputs(logging=logging, budgets=Budgets(disk_bytes=60_000_000)))
    room = 60_000_000 - 3 * shared.storage["checkpoint_bytes"]
    assert shared.save_every_n_steps > alone.save_every_n_steps
    assert _fits(room, shared.save_every_n_steps) and not _fits(room, shared.save_every_n_steps - 1)


def test_memory_budget_defaults_to_the_gpus_memory():
    f = forecast(_inputs(gpu="a100-40gb"))
    assert f.verdicts["memory"].budget_bytes == gpu("a100-40gb").memory_bytes == f.memory["budget_bytes"]
    assert f.verdicts["memory"].projected_bytes == f.memory["peak_bytes"]
    f = forecast(_inputs(gpu="a100-40gb", budgets=Budgets(memory_bytes=1000)))
    assert f.verdicts["memory"].budget_bytes == 1000 and f.decision == "abort"  # memory cannot be downsampled
    assert forecast(_inputs()).verdicts["memory"].budget_bytes is None  # no GPU, no budget: not checked


def test_wandb_budget_checks_the_whole_upload():
    logging = LoggingSpec(log_every_n_steps=1, console=None)
    f = forecast(_inputs(logging=logging, budgets=Budgets(wandb_bytes=100_000)))
    assert f.verdicts["wandb"].projected_bytes == f.wandb["total_bytes"] == wandb_usage(
        logging, 1000, f.storage["checkpoint_bytes"])["total_bytes"]
    assert f.decision == "abort" and "log_every_n_steps" in f.verdicts["wandb"].advice[0]


# --------------------------------------------------------------------------- time

@pytest.mark.parametrize("name, prec, dtype", [("h100", "bf16-mixed", "bfloat16"), ("a100-80gb", "32-true", "float32"),
                                               ("l4", "16-true", "float16")])
def test_run_time_is_flops_over_the_gpus_dense_peak(name, prec, dtype):
    setup = TrainSetup(devices=8, micro_batch_size=2, precision=prec, strategy="fsdp")
    f = forecast(_inputs(preset("gpt2"), steps=500, setup=setup, gpu=name, mfu=0.35))
    peak = gpu(name).flops[dtype]
    assert f.time["peak_flops_per_device"] == int(peak)
    assert f.time["step_seconds"] == pytest.approx(f.flops["train_per_step"] / (peak * 8 * 0.35), rel=1e-12)
    assert f.time["train_seconds"] == pytest.approx(500 * f.time["step_seconds"], rel=1e-12)
    assert f.flops["train_total"] == 500 * f.flops["train_per_step"]
    assert f.flops["tokens_per_step"] == 1024 * 2 * 8


def test_no_gpu_no_time():
    t = forecast(_inputs()).time
    assert t["peak_flops_per_device"] is None and t["step_seconds"] is None and t["train_seconds"] is None


def test_the_result_is_plain_json():
    logging = LoggingSpec(checkpoint_every_n_steps=10)
    f = forecast(_inputs(gpu="h100", logging=logging, budgets=Budgets(disk_bytes=10**8)))
    d = json.loads(json.dumps(f.to_dict()))
    assert d["save_every_n_steps"] == f.save_every_n_steps and d["decision"] == f.decision
    assert d["budgets"]["disk"]["fits"] == f.verdicts["disk"].fits
