"""The whole forecast: one function from plain inputs to an itemised result.

Used by ``budget-callback plan`` (inputs from the command line) and by
``BudgetCallback.setup`` (inputs gathered from the Trainer). No Trainer, no
disk, no network here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..snapshots.format import SnapshotLayout, ring_cap
from ..snapshots.schedule import Schedule, series_bytes, solve_interval
from ..units import format_bytes
from ..validate import one_of, positive_int
from . import flops as F
from .budgets import POLICIES, Verdict, decide
from .checkpoint import checkpoint_bytes
from .gpus import gpu as lookup_gpu
from .memory import (ShardedModel, TrainSetup, activation_bytes, compiled_unsupported, max_batch_size, max_batch_size_traced,
                     min_devices, min_devices_traced, peak_memory)
from .params import count_params
from .shapes import ModelShape
from .wandb_usage import LoggingSpec, wandb_usage

SCALING_VOCAB_SIZES = (128, 1_000, 5_000, 10_000, 32_000, 50_000)
DEFAULT_MFU = 0.4
# What no compiled forecast models, traced or analytic (a note whenever one is made).
COMPILED_CAVEATS = ("compiled: one graph per compiled region (graph breaks not modelled); inductor's CPU code "
                    "generation (CUDA/Triton fuse and reuse buffers differently in details); max-autotune and CUDA "
                    "graphs (reduce-overhead) not modelled")
COMPILED_ANALYTIC = "analytic compiled transformer (inductor partition modelled from fake-tensor traces)"


@dataclass(frozen=True)
class SnapshotSpec:
    save_every_n_steps: int = 1
    dtype: str = "bfloat16"
    snapshots_per_file: int = 1
    include_embedding: bool = False
    queue_depth: int = 4  # snapshots waiting for the writer (bounded queue)
    host_ram_bytes: int | None = None  # host RAM available when training starts (caps the ring); None: not known

    def __post_init__(self) -> None:
        positive_int("save_every_n_steps", self.save_every_n_steps)
        positive_int("queue_depth", self.queue_depth)

    def layout(self, shape: ModelShape) -> SnapshotLayout:
        return SnapshotLayout(shape.vocab_size, shape.d_model, self.dtype, self.snapshots_per_file,
                              self.include_embedding, shape.tied)


@dataclass(frozen=True)
class Budgets:
    disk_bytes: int | None = None
    memory_bytes: int | None = None  # None: the --gpu's memory, if any
    wandb_bytes: int | None = None
    on_exceed: str = "downsample"

    def __post_init__(self) -> None:
        one_of("on_exceed", self.on_exceed, POLICIES)


@dataclass(frozen=True)
class PlanInputs:
    shape: ModelShape
    setup: TrainSetup = TrainSetup()
    steps: int = 1000
    snapshot: SnapshotSpec = SnapshotSpec()
    logging: LoggingSpec = LoggingSpec()
    budgets: Budgets = Budgets()
    gpu: str | None = None
    mfu: float = DEFAULT_MFU
    checkpoints_share_disk: bool = True  # checkpoints (and W&B staging, unless logging says) share the snapshots' disk
    steps_per_batch: int = 1  # optimizer steps per batch (manual optimization with several optimizers)
    resume: dict | None = None  # the series' schedule state when resuming (see snapshots.schedule)
    capture_device_bytes: int | None = None  # accelerator bytes a snapshot needs; None: derived for a GPU run
    strategy_name: str | None = None  # the strategy as the Trainer has it (for the report), e.g. "SingleDevice"

    def __post_init__(self) -> None:
        positive_int("steps", self.steps)
        positive_int("steps_per_batch", self.steps_per_batch)
        seq = self.setup.seq_len
        if seq is not None and self.shape.learned_pos and seq > self.shape.n_ctx:
            raise ValueError(f"`seq_len` ({seq}) exceeds the learned position table `n_ctx` ({self.shape.n_ctx}); "
                             "raise n_ctx or shorten the sequence")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"`mfu` must be in (0, 1], got {self.mfu!r}")
        if self.gpu is not None:
            lookup_gpu(self.gpu)
        why = compiled_unsupported(self.shape, self.setup) if self.setup.compile else None
        if why:
            raise ValueError(f"`compile`: {why}; the compiled forecast is modelled for GPT-2-style blocks under ddp "
                             "in bf16-mixed, 16-mixed or 32-true only (drop it for the eager forecast, or let "
                             "BudgetCallback trace the compiled module at fit start)")

    def layout(self) -> SnapshotLayout:
        return self.snapshot.layout(self.shape)

    def schedule(self, every: int | None = None) -> Schedule:
        """The series' schedule at the start of this fit (continued when resuming), at interval ``every``."""
        layout = self.layout()
        if self.resume is not None:
            schedule = Schedule.from_state(layout, self.resume)
            if every is not None and every != schedule.every:
                schedule.change_interval(every)
            return schedule
        return Schedule.start(layout, every or self.snapshot.save_every_n_steps, self.steps_per_batch)

    def capture_bytes(self) -> int:
        """Accelerator bytes a snapshot allocates: a sharded W gathered whole, the cast to the snapshot dtype."""
        if self.capture_device_bytes is not None:
            return self.capture_device_bytes
        layout = self.layout()
        gathered = self.setup.strategy in ("fsdp", "deepspeed_stage_3")
        param_bytes = self.setup.prec.param_bytes
        per_matrix = self.shape.vocab_size * self.shape.d_model
        cast = layout.itemsize if layout.itemsize != param_bytes or gathered else 0
        return len(layout.names) * per_matrix * ((param_bytes if gathered else 0) + cast)


@dataclass
class Forecast:
    """The setup-time forecast. ``to_dict()`` is the schema of ``plan --json``."""

    inputs: PlanInputs
    params: dict
    memory: dict
    flops: dict
    time: dict
    storage: dict
    wandb: dict
    verdicts: dict[str, Verdict]
    save_every_n_steps: int
    decision: str  # "fits" | "downsampled" | "abort" | "warn" | "unknown" (a budget's projection is not known)
    notes: list[str] = field(default_factory=list)
    model: dict | None = None  # a module with no declared shape: what was found in it (else the shape)

    @property
    def fits(self) -> bool:
        return all(v.fits for v in self.verdicts.values())

    def to_dict(self) -> dict:
        i = self.inputs
        return {
            "model": dict(self.model) if self.model is not None else {**i.shape.to_dict(), "declared": True},
            "run": {
                **i.setup.to_dict(),
                "strategy_name": i.strategy_name,
                "steps_per_batch": i.steps_per_batch,
                "steps": i.steps,
                "seq_len": i.setup.seq(i.shape),
                "snapshot": vars(i.snapshot).copy(),
                "logging": i.logging.to_dict(),
                "gpu": i.gpu,
                "mfu": i.mfu,
            },
            "params": dict(self.params),
            "memory": self.memory,
            "flops": self.flops,
            "time": self.time,
            "storage": self.storage,
            "wandb": self.wandb,
            "budgets": {k: v.to_dict() for k, v in self.verdicts.items()},
            "requested_save_every_n_steps": i.snapshot.save_every_n_steps,
            "save_every_n_steps": self.save_every_n_steps,
            "decision": self.decision,
            "notes": list(self.notes),
        }


def _storage(inputs: PlanInputs, every: int, n_params: int, n_tensors: int, entries: int) -> dict:
    setup, snap = inputs.setup, inputs.snapshot
    layout = inputs.layout()
    schedule = inputs.schedule(every)
    snaps = schedule.projected_bytes(inputs.steps)
    count = schedule.projected_count(inputs.steps)
    ckpt = checkpoint_bytes(n_params, n_tensors, setup.prec.param_bytes, setup.optimizer, setup.momentum, entries)
    kept = inputs.logging.checkpoints_kept(inputs.steps)
    usage = wandb_usage(inputs.logging, inputs.steps, ckpt)
    per_file = min(snap.snapshots_per_file, max(1, count))
    staging_shares = inputs.logging.staging_shares_disk
    staging = usage["artifact_staging_bytes"] if (inputs.checkpoints_share_disk if staging_shares is None
                                                  else staging_shares) else 0  # counted where it lands
    # a checkpoint writes the open stacked file as it stands, and later rewrites it bigger: while the new
    # copy is written the old one is still there
    rewrite = layout.file_bytes(every, per_file, every) if layout.stacked and inputs.logging.checkpoint_every_n_steps \
        else 0
    ring = ring_cap(layout, snap.queue_depth, snap.host_ram_bytes)
    scaling = []
    for vocab in SCALING_VOCAB_SIZES:
        trial = replace(layout, vocab_size=vocab)
        scaling.append({
            "vocab_size": vocab,
            "snapshot_file_bytes": trial.file_bytes(every, per_file, every),
            "snapshot_bytes": Schedule.start(trial, every, inputs.steps_per_batch).projected_bytes(inputs.steps),
        })
    return {
        "snapshot_file_bytes": layout.file_bytes(every, per_file, every),
        "snapshot_count": count,
        "snapshot_files": schedule.projected_files(inputs.steps),
        "snapshot_bytes": snaps,
        "per_1000_steps_bytes": series_bytes(layout, 1000, every),
        "checkpoint_bytes": ckpt,
        "checkpoints_kept": kept,
        "checkpoints_bytes": kept * ckpt,
        "wandb_staging_bytes": usage["artifact_staging_bytes"],
        "wandb_staging_on_disk_bytes": staging,
        "rewrite_headroom_bytes": rewrite,
        "total_bytes": snaps + rewrite + (kept * ckpt if inputs.checkpoints_share_disk else 0) + staging,
        "host_buffer_bytes": ring.total_bytes,  # the snapshot ring at most: its cap, and why
        "host_buffer_images": ring.buffers,
        "host_buffer_basis": ring.basis,
        "host_ram_available_bytes": ring.available_bytes,
        "host_ram_share": ring.share,
        "scaling": scaling,
    }


@dataclass(frozen=True)
class Measured:
    """Figures the callback takes from the real module instead of the analytic shape."""

    n_params: int
    n_tensors: int
    state_dict_entries: int
    memory: dict | None = None  # peak_memory()-shaped dict from a traced step; None: analytic
    train_flops_per_sequence: int | None = None  # forward + backward FLOPs of one sequence, traced
    method: str = "analytic transformer"
    trace: dict | None = None  # the traced step's byte figures (tracing.trace_training_step_memory)
    trace_per_sample: dict | None = None  # their slope per sample of the micro-batch (two traces)
    model: dict | None = None  # what was found in a module that declares no shape (name, counts, layers, tied)
    # (micro-batch, trace) the slope starts from when it is not the run's own: a compiled step's peak is affine
    # in the micro-batch only from 3 on, so its line is anchored there and the run's micro-batch traced as it is
    trace_anchor: tuple[int, dict] | None = None
    mode: str = "eager"  # "eager" | "compiled": what the traced step ran as
    memory_known: bool = True  # False: the step could not be traced nor estimated (``memory`` is a lower bound)
    memory_basis: str = ""  # said beside the memory verdict: an estimate, or why the memory is unknown
    sharded: ShardedModel | None = None  # FSDP2: this device's shards and gathered units (the trace is unsharded)
    # the step traced again at another micro-batch (its trace dict): the largest micro-batch that fits is decided
    # by traces, the slope only guesses (None: on the line)
    retrace: Callable[[int], dict] | None = field(default=None, repr=False, compare=False)


def forecast(inputs: PlanInputs, measured: Measured | None = None, free_disk_bytes: int | None = None) -> Forecast:
    """Forecast a run and apply the budget policy.

    ``measured`` carries exact figures from a module (parameter and tensor
    counts; for a module that is not a known transformer shape, a traced memory
    peak and FLOPs). ``free_disk_bytes`` is the disk budget when none is set.
    """
    shape, setup = inputs.shape, inputs.setup
    params = count_params(shape)
    n = params["total"] if measured is None else measured.n_params
    if measured is not None and measured.n_params != params["total"]:
        params = {"total": n}
    n_tensors = measured.n_tensors if measured else _tensor_count(shape)
    entries = measured.state_dict_entries if measured else n_tensors + (1 if shape.tied else 0)
    traced = measured is not None and measured.memory is not None
    notes: list[str] = []

    # memory ------------------------------------------------------------------
    device = lookup_gpu(inputs.gpu) if inputs.gpu else None
    budget_memory = inputs.budgets.memory_bytes or (device.memory_bytes if device else None)
    capture = inputs.capture_bytes()
    if traced:
        mem = dict(measured.memory)
        mem["activations"] = {"total": mem["activations_bytes"]}
        mem["known"], mem["basis"] = measured.memory_known, measured.memory_basis
        mem["activations_method"] = measured.method
        mem["max_batch_size"] = mem["min_devices"] = None
        mem["limits_known"] = measured.trace is not None
        # False: a compiled step at fit start, traced at its own micro-batch only (no slope)
        mem["largest_traced"] = measured.trace_per_sample is not None or measured.mode != "compiled"
        if measured.trace is not None:
            mem["trace"] = {k: v for k, v in measured.trace.items() if isinstance(v, int)}
            mem["trace_per_sample"] = measured.trace_per_sample
        if budget_memory and measured.trace is not None:
            if measured.trace_per_sample is not None:
                anchor_batch, anchor = measured.trace_anchor or (setup.micro_batch_size, measured.trace)
                mem["max_batch_size"] = max_batch_size_traced(anchor, measured.trace_per_sample, anchor_batch, setup,
                                                              budget_memory, capture,
                                                              exact={setup.micro_batch_size: measured.trace},
                                                              sharded=measured.sharded, retrace=measured.retrace)
            mem["min_devices"] = min_devices_traced(measured.trace, setup, budget_memory, capture,
                                                    sharded=measured.sharded)
        mem["mode"] = measured.mode
    else:
        mem = peak_memory(shape, setup, n, capture_bytes=capture)
        mem["activations"] = activation_bytes(shape, setup)
        mem["activations_method"] = COMPILED_ANALYTIC if setup.compile else (
            (measured.method if measured else "analytic transformer")
            + (" (flash attention)" if setup.flash_attention else " (materialised attention)"))
        mem["mode"] = "compiled" if setup.compile else "eager"
        mem["limits_known"] = True
        mem["max_batch_size"] = max_batch_size(shape, setup, budget_memory, n, capture_bytes=capture) \
            if budget_memory else None
        mem["min_devices"] = min_devices(shape, setup, budget_memory, n, capture_bytes=capture) \
            if budget_memory else None
    mem["budget_bytes"] = budget_memory

    # flops and time ----------------------------------------------------------
    T = setup.seq(shape)
    sequences = setup.micro_batch_size * setup.grad_accum * setup.world_size
    step = F.train_flops_per_step(shape, T, sequences)
    if traced and measured.train_flops_per_sequence is not None:
        total = measured.train_flops_per_sequence * sequences
        step = {"forward": total // 3, "backward": total - total // 3, "total": total}
    flops = {
        "forward_per_sequence": F.forward_flops(shape, T) if not traced else {"total": step["forward"] // sequences},
        "forward_per_step": step["forward"],
        "backward_per_step": step["backward"],
        "train_per_step": step["total"],
        "optimizer_per_step": F.optimizer_flops(n, setup.optimizer, setup.momentum),
        "palm_per_step": F.palm_flops_per_token(shape, T) * T * sequences if not traced else None,
        "tokens_per_step": T * sequences,
        "train_total": step["total"] * inputs.steps,
        "method": "traced (torch.utils.flop_counter)" if traced else "analytic",
    }
    time = {"gpu": inputs.gpu, "peak_flops_per_device": None, "mfu": inputs.mfu, "step_seconds": None, "train_seconds": None}
    if device:
        peak = device.peak_flops(setup.prec.torch_dtype)
        time.update(peak_flops_per_device=int(peak),
                    step_seconds=F.train_seconds(step["total"], peak, setup.world_size, inputs.mfu),
                    train_seconds=F.train_seconds(flops["train_total"], peak, setup.world_size, inputs.mfu))

    # storage, W&B, budgets ---------------------------------------------------
    requested = inputs.snapshot.save_every_n_steps
    start = inputs.schedule()  # a resumed series keeps the interval it already uses
    current = start.interval
    storage = _storage(inputs, current, n, n_tensors, entries)
    usage = wandb_usage(inputs.logging, inputs.steps, storage["checkpoint_bytes"], time["train_seconds"])
    budgets = inputs.budgets
    disk_budget = budgets.disk_bytes if budgets.disk_bytes is not None else free_disk_bytes
    verdicts = {
        "disk": Verdict("disk", storage["total_bytes"], disk_budget),
        "memory": Verdict("memory", mem["peak_bytes"], budget_memory, known=mem.get("known", True),
                          basis=mem.get("basis", "")),
        "wandb": Verdict("wandb", usage["total_bytes"], budgets.wandb_bytes),
    }
    every, decision = current, "fits"
    other_disk = storage["total_bytes"] - storage["snapshot_bytes"]
    if not verdicts["disk"].fits:
        room = disk_budget - other_disk
        solved = solve_interval(start, inputs.steps, room) if room >= 0 else None
        headroom = storage["rewrite_headroom_bytes"]
        if solved is None and headroom:  # fewer snapshots per file need less headroom: the least, then check
            least = inputs.layout().file_bytes(current, 1, current)
            solved = solve_interval(start, inputs.steps, room + headroom - least)
            for _ in range(64):
                if solved is None or _storage(inputs, solved, n, n_tensors, entries)["total_bytes"] <= disk_budget:
                    break
                solved = solve_interval(start, inputs.steps, room + headroom - least, at_least=solved + 1)
            else:
                solved = None
        verdicts["disk"].advice = _disk_advice(solved, current, inputs, room, storage["snapshot_bytes"])
        if budgets.on_exceed == "downsample" and solved is not None:
            every, decision = solved, "downsampled"
            storage = _storage(inputs, every, n, n_tensors, entries)
            verdicts["disk"] = Verdict("disk", storage["total_bytes"], disk_budget)
            notes.append(f"save_every_n_steps raised from {current} to {every} so snapshots fit the disk budget")
    if verdicts["memory"].exceeds:
        verdicts["memory"].advice = _memory_advice(mem)
    if not verdicts["wandb"].fits:
        verdicts["wandb"].advice = ["log less often (log_every_n_steps) or upload fewer checkpoints (log_model)"]
    decision = decide(verdicts, budgets.on_exceed, decision == "downsampled")
    if traced:
        notes.append(f"activations and FLOPs: {measured.method}")
    if mem["mode"] == "compiled":
        notes.append(COMPILED_CAVEATS)
    model = measured.model if measured is not None else None
    return Forecast(inputs, params, mem, flops, time, storage, usage, verdicts, every, decision, notes, model)


def _tensor_count(shape: ModelShape) -> int:
    per_layer = 2 * (2 if shape.norm == "layernorm" and shape.norm_bias else 1) + (4 if shape.bias else 2) * 2
    return (1 + (1 if shape.learned_pos else 0) + shape.n_layer * per_layer
            + (2 if shape.norm == "layernorm" and shape.norm_bias else 1) + (0 if shape.tied else 1))


def _disk_advice(solved: int | None, current: int, inputs: PlanInputs, room: int, snapshot_bytes: int) -> list[str]:
    advice = []
    if solved is not None:
        advice.append(f"raise save_every_n_steps from {current} to {solved}")
    else:
        advice.append(f"not even one snapshot fits: {format_bytes(max(room, 0))} left after checkpoints")
    if inputs.snapshot.dtype == "float32":
        advice.append("store snapshots as bfloat16 (half the bytes)")
    if inputs.snapshot.include_embedding and not inputs.shape.tied:
        advice.append("drop include_embedding (half the bytes)")
    advice.append(f"or free {format_bytes(max(0, snapshot_bytes - room))} on the disk")
    return advice


def _memory_advice(mem: dict) -> list[str]:
    advice = []
    if mem.get("max_batch_size"):
        advice.append(f"largest micro-batch that fits: {mem['max_batch_size']}")
    else:
        advice.append("not even micro-batch 1 fits on one device")
    if mem.get("min_devices"):
        advice.append(f"fewest devices that fit under a sharded strategy: {mem['min_devices']}")
    advice.append("or try activation checkpointing, bf16-true, or a sharded strategy (fsdp, deepspeed_stage_3)")
    return advice
