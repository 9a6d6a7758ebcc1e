"""Gather forecast inputs from a live Trainer and LightningModule (no forecasting here)."""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from ..forecast.memory import TrainSetup
from ..forecast.precision import PRECISIONS, normalise
from ..forecast.shapes import ModelShape
from ..forecast.console import END_LINE_CHARS, ConsoleSpec
from ..forecast.wandb_usage import LoggingSpec


def find_shape(module: nn.Module) -> ModelShape | None:
    """The :class:`ModelShape` a module declares (``module.shape``, on it or a child), if any."""
    for sub in module.modules():
        shape = getattr(sub, "shape", None)
        if isinstance(shape, ModelShape):
            return shape
    return None


def strategy_name(trainer: pl.Trainer) -> str:
    name = type(trainer.strategy).__name__.lower()
    if "fsdp" in name or "modelparallel" in name:  # ModelParallelStrategy: FSDP2 over the data-parallel ranks
        return "fsdp"
    if "deepspeed" in name:
        stage = getattr(trainer.strategy, "config", {}).get("zero_optimization", {}).get("stage", 2)
        return f"deepspeed_stage_{max(1, min(3, int(stage)))}"
    return "ddp"  # DDP, single device, and everything that replicates the model


def precision_name(trainer: pl.Trainer) -> str:
    """The Trainer's precision as the forecast's tables know it. One they do not (``transformer-engine``,
    a quantizing or custom plugin) is sized by the parameters' own dtype: see :func:`precision_note`."""
    name = normalise(trainer.precision)
    if name in PRECISIONS:
        return name
    dtypes = Counter()
    for p in trainer.lightning_module.parameters() if trainer.lightning_module is not None else ():
        dtypes[p.dtype] += p.numel()
    dtype = dtypes.most_common(1)[0][0] if dtypes else torch.float32
    return {torch.float64: "64-true", torch.bfloat16: "bf16-true", torch.float16: "16-true"}.get(dtype, "32-true")


def precision_note(trainer: pl.Trainer) -> str | None:
    name = normalise(trainer.precision)
    if name in PRECISIONS:
        return None
    return (f"precision {str(trainer.precision)!r} has no table in the forecast: sized as "
            f"{precision_name(trainer)} from the parameters' dtype")


def steps_per_batch(trainer: pl.Trainer, module: pl.LightningModule) -> int:
    """Optimizer steps one batch is expected to take: 1, or the number of optimizers under manual optimization
    (each ``opt.step()`` advances ``global_step``; the schedule follows what it then sees)."""
    if module.automatic_optimization:
        return 1
    return max(1, len(trainer.optimizers))


def final_step(trainer: pl.Trainer, stride: int) -> int:
    """The ``global_step`` this fit will end at: the first batch end at or past ``max_steps``, or the last
    batch of ``max_epochs`` (each epoch's accumulation as a ``GradientAccumulationScheduler`` sets it), batch
    ends every ``stride`` optimizer steps."""
    limits = []
    if trainer.max_steps not in (None, -1):
        limits.append(-(-trainer.max_steps // stride) * stride)
    epochs = _epoch_steps(trainer, stride)
    if epochs is not None:
        limits.append(epochs)
    if not limits:
        raise ValueError("BudgetCallback needs to know how many optimizer steps the run takes, and "
                         + _why_unbounded(trainer) + ": set `max_steps` on the Trainer (it can be generous: "
                         "the disk guard checks the room left as the run goes)")
    return min(limits)


def _epoch_steps(trainer: pl.Trainer, stride: int) -> int | None:
    """Optimizer steps in ``max_epochs`` epochs (None: no epoch limit, or batches that cannot be counted)."""
    batches = trainer.num_training_batches
    if trainer.max_epochs in (None, -1) or not isinstance(batches, int) or math.isinf(batches):
        return None
    if stride > 1:  # manual optimization: every batch steps each optimizer
        return trainer.max_epochs * batches * stride
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    scheduler = next((cb for cb in trainer.callbacks if isinstance(cb, GradientAccumulationScheduler)), None)
    # Lightning steps at every `accumulate`-th batch and at the epoch's last batch
    if scheduler is None:
        return -(-batches // int(trainer.accumulate_grad_batches)) * max(trainer.max_epochs, 1)
    return sum(-(-batches // scheduler.get_accumulate_grad_batches(e)) for e in range(max(trainer.max_epochs, 1)))


def _why_unbounded(trainer: pl.Trainer) -> str:
    if trainer.max_epochs not in (None, -1):
        return "the dataloader has no length to count epochs in (an IterableDataset)"
    timer = next((cb for cb in trainer.callbacks if type(cb).__name__ == "Timer"), None)
    if timer is not None and getattr(timer, "_duration", None):
        return f"the Trainer is limited only by time (`max_time`, {timer._duration:g} s)"
    return "the Trainer has no limit (`max_epochs=-1` and no `max_steps`)"


def optimizer_settings(trainer: pl.Trainer, on_cuda: bool) -> tuple[str, float, str, torch.optim.Optimizer | None]:
    """(name for the forecast, momentum, implementation, the optimizer)."""
    if not trainer.optimizers:
        return "sgd", 0.0, "for-loop", None
    opt = trainer.optimizers[0]
    return (*describe_optimizer(opt, on_cuda), opt)


def describe_optimizer(opt: torch.optim.Optimizer, on_cuda: bool) -> tuple[str, float, str]:
    """(name for the forecast, momentum, implementation) of one optimizer."""
    kind = type(opt).__name__.lower()
    defaults = opt.defaults
    if kind in ("adamw", "adam"):
        name, momentum = kind, 0.0
    elif kind == "sgd":
        name, momentum = "sgd", float(defaults.get("momentum", 0.0) or 0.0)
    else:
        name, momentum = "adamw", 0.0  # two states per parameter: the common case for adaptive optimizers
    if defaults.get("fused"):
        impl = "fused"
    elif defaults.get("foreach") or (defaults.get("foreach") is None and on_cuda):
        impl = "foreach"
    else:
        impl = "for-loop"
    return name, momentum, impl


def batch_dims(batch) -> tuple[int, int] | None:
    """(micro-batch, sequence length) from the first 2-D integer tensor in the batch."""
    stack = [batch]
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.Tensor):
            if item.dim() >= 2 and not item.is_floating_point():
                return int(item.shape[0]), int(item.shape[1])
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return None


def train_setup(trainer: pl.Trainer, batch: int, seq_len: int | None, optimizer: str, momentum: float,
                impl: str) -> TrainSetup:
    return TrainSetup(
        micro_batch_size=batch,
        seq_len=seq_len,
        grad_accum=int(trainer.accumulate_grad_batches),
        devices=int(trainer.num_devices),
        num_nodes=int(trainer.num_nodes),
        precision=precision_name(trainer),
        optimizer=optimizer,
        momentum=momentum,
        optimizer_impl=impl,
        strategy=strategy_name(trainer),
    )


def logging_spec(trainer: pl.Trainer, steps: int, budget_metrics: int, console: ConsoleSpec | None = None
                 ) -> tuple[LoggingSpec, list[Path]]:
    """Logging cadence, checkpoint cadence and where checkpoints go."""
    every, keep, dirs = None, 1, []
    for cb in trainer.checkpoint_callbacks:
        n = getattr(cb, "_every_n_train_steps", 0) or 0
        if n:
            every = n if every is None else min(every, n)
        elif getattr(cb, "_every_n_epochs", 0):
            per_epoch = max(1, int(trainer.num_training_batches) // max(1, int(trainer.accumulate_grad_batches))) \
                if isinstance(trainer.num_training_batches, int) else steps
            every = per_epoch if every is None else min(every, per_epoch)
        top_k = getattr(cb, "save_top_k", 1)
        keep = steps if top_k == -1 else max(1, top_k) + (1 if getattr(cb, "save_last", False) else 0)
        if cb.dirpath:
            dirs.append(Path(cb.dirpath))
        elif trainer.default_root_dir:
            dirs.append(Path(trainer.default_root_dir))
    log_model, staging = "none", None
    for logger in trainer.loggers:
        value = getattr(logger, "_log_model", None)  # WandbLogger keeps it privately
        if value == "all":
            log_model = "all"
        elif value:
            log_model = "last"
        if value:
            staging = wandb_staging_shares_disk(logger, _snapshot_dirs(trainer))
    spec = LoggingSpec(log_every_n_steps=max(1, int(trainer.log_every_n_steps)), checkpoint_every_n_steps=every,
                       keep_checkpoints=keep, log_model=log_model, budget_metrics=budget_metrics, console=console,
                       staging_shares_disk=staging)
    return spec, dirs


def _snapshot_dirs(trainer: pl.Trainer) -> list[Path]:
    from .callback import BudgetCallback  # here: the callback imports this module

    return [cb.snapshot_dir for cb in trainer.callbacks if isinstance(cb, BudgetCallback)]


def wandb_staging_shares_disk(logger, snapshot_dirs: list[Path]) -> bool | None:
    """Whether W&B's copies of the checkpoints a WandbLogger logs land on a snapshot directory's file system: the
    staging area under ``WANDB_DATA_DIR`` (default ``~/.local/share/wandb``) and, once uploaded, the cache under
    ``WANDB_CACHE_DIR`` they move to. ``add_file_policy="immutable"`` makes no copy. None: not known."""
    if getattr(logger, "add_file_policy", "mutable") == "immutable":
        return False
    if not snapshot_dirs:
        return None
    try:
        from wandb import env
    except ImportError:  # pragma: no cover - wandb is a dependency
        return None
    places = [Path(env.get_data_dir()) / "artifacts" / "staging"]
    if not getattr(logger, "_offline", False) and os.environ.get("WANDB_MODE") not in ("offline", "dryrun",
                                                                                      "disabled"):
        places.append(Path(env.get_cache_dir()))
    return any(same_file_system(d, p) for d in snapshot_dirs for p in places)


def console_spec(trainer: pl.Trainer, module: nn.Module, report_chars: int, cuda: bool) -> ConsoleSpec:
    """What the run will print, which W&B captures: the progress bar, the model summary, our report."""
    from lightning.pytorch.callbacks import ModelSummary
    from lightning.pytorch.utilities.model_summary import ModelSummary as Summary

    bar = trainer.progress_bar_callback
    enabled = bar is not None and bar.is_enabled
    refresh = int(getattr(bar, "refresh_rate", 1) or 0) if enabled else 0
    console = "auto"
    from .wandb_panels import wandb_loggers

    for logger in wandb_loggers(trainer.loggers):
        try:
            console = str(logger.experiment.settings.console)
        except Exception:  # noqa: BLE001 - best effort: the default is W&B's own
            pass
    summary = 0
    for cb in trainer.callbacks:
        if isinstance(cb, ModelSummary):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                summary = len(str(Summary(module, max_depth=getattr(cb, "_max_depth", 1)))) + 1
    columns = None
    if sys.stdout.isatty():
        try:
            columns = os.get_terminal_size(sys.stdout.fileno()).columns
        except OSError:
            columns = None
    batches = trainer.num_training_batches if isinstance(trainer.num_training_batches, int) else None
    val = sum(trainer.num_val_batches) if isinstance(trainer.num_val_batches, list) and all(
        isinstance(n, int) for n in trainer.num_val_batches) else 0
    return ConsoleSpec(progress_bar=enabled,
                       refresh_rate=max(1, refresh), batches_per_epoch=batches or None, prog_bar_metrics=1,
                       val_batches=val, sanity_batches=int(trainer.num_sanity_val_steps or 0),
                       console=console if console in ("auto", "wrap", "wrap_raw", "off", "wrap_emu", "redirect")
                       else "auto", terminal_columns=columns, model_summary_chars=summary,
                       report_chars=report_chars, end_line_chars=END_LINE_CHARS, cuda=cuda)


def same_file_system(a: Path, b: Path) -> bool:
    def device(p: Path) -> int | None:
        p = p.absolute()
        while not p.exists() and p != p.parent:
            p = p.parent
        try:
            return os.stat(p).st_dev
        except OSError:
            return None
    return device(a) == device(b)


def memory_budget_default(module: nn.Module) -> tuple[int, bool]:
    """(the accelerator's total memory, True) on a GPU; (host RAM, False) otherwise."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory), True
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), False
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 0, False


def state_dict_entries(module: nn.Module) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return len(module.state_dict())


def module_params(module: nn.Module) -> dict[str, int]:
    """Exact count from a module (any device, ``meta`` included); shared tensors once.

    Returns ``{"trainable": n, "frozen": m, "total": n + m, "tensors": k}``.
    """
    trainable = frozen = tensors = 0
    for p in module.parameters():  # parameters() de-duplicates shared Parameters
        tensors += 1
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return {"trainable": trainable, "frozen": frozen, "total": trainable + frozen, "tensors": tensors}


def module_counts(module: nn.Module) -> tuple[int, int]:
    counts = module_params(module)
    return counts["total"], counts["tensors"]


def gpu_table_name(device: torch.device) -> str | None:
    """Our dense GPU table's entry for the CUDA device in use, if it is one we know."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    name = props.name.lower()
    if "h200" in name:
        return "h200"
    if "h100" in name:
        return "h100-pcie" if "pcie" in name else "h100-sxm"
    if "a100" in name:
        return "a100-80gb" if props.total_memory > 50 * 1024**3 else "a100-40gb"
    if " l4" in f" {name}":
        return "l4"
    return None


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of the device: our sourced table, else Lightning's ``get_available_flops``."""
    from ..forecast.gpus import gpu

    name = gpu_table_name(device)
    if name is not None:
        return gpu(name).peak_flops(str(dtype).replace("torch.", ""))
    if device.type != "cuda":
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    return get_available_flops(device, dtype)


def is_sharded(trainer: pl.Trainer, weight: torch.Tensor) -> bool:
    """True when W must be gathered by every rank before rank 0 can read it."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - older torch
        DTensor = ()  # noqa: N806
    return strategy_name(trainer) == "fsdp" or isinstance(weight, DTensor)


def module_peak_flops(trainer: pl.Trainer, module: nn.Module) -> float | None:
    """Dense peak FLOP/s of the device the module trains on, in the precision's compute dtype."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    compute = getattr(torch, PRECISIONS[precision_name(trainer)].torch_dtype)
    return device_peak_flops(device, compute)


def full_params(trainer: pl.Trainer, sharded: bool):
    """For FSDP (1): a factory of the context in which rank 0 sees the full parameters (every rank enters it).
    DTensor weights (FSDP2, tensor parallel) are gathered by ``full_tensor()`` instead: None."""
    if not sharded or strategy_name(trainer) != "fsdp" or trainer.strategy.model is None:
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = trainer.strategy.model
    if not any(isinstance(m, FSDP) for m in model.modules()):
        return None
    return lambda: FSDP.summon_full_params(model, writeback=False, rank0_only=True)


def strategy_label(trainer: pl.Trainer) -> str:
    """The strategy as the Trainer has it, for the report: ``SingleDeviceStrategy`` -> ``single device``."""
    name = type(trainer.strategy).__name__.removesuffix("Strategy")
    words = "".join(f" {c.lower()}" if c.isupper() and i and not name[i - 1].isupper() else c.lower()
                    for i, c in enumerate(name)).strip()
    return f"{words} x {trainer.world_size}" if trainer.world_size > 1 else words


def describe_module(module: nn.Module, layout) -> dict:
    """What a module that declares no shape is made of, as far as can be told without its code."""
    counts = module_params(module)
    stacks = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1]
    stack = max(stacks, key=len, default=None)
    layer_params = sum(p.numel() for p in stack[0].parameters()) if stack is not None else None
    name = type(getattr(module, "_orig_mod", module)).__name__  # torch.compile's wrapper: the model it wraps
    return {"name": name, "declared": False, "parameters": counts["total"],
            "tensors": counts["tensors"], "layers": len(stack) if stack is not None else None,
            "layer_params": layer_params, "tied": layout.tied, "vocab_size": layout.vocab_size,
            "hidden_dim": layout.hidden_dim}


# Lightning callbacks known not to change the weights between an optimizer step and the next
_SAFE_CALLBACKS = ("ModelCheckpoint", "EarlyStopping", "LearningRateMonitor", "TQDMProgressBar", "RichProgressBar",
                   "ModelSummary", "RichModelSummary", "Timer", "ThroughputMonitor", "DeviceStatsMonitor",
                   "GradientAccumulationScheduler", "BudgetCallback", "LearningRateFinder", "BatchSizeFinder")
# hooks that run between a batch's end and the next optimizer step
_BETWEEN_STEPS = ("on_train_batch_end", "on_train_batch_start", "on_train_epoch_end", "on_train_epoch_start",
                  "on_validation_start", "on_validation_epoch_start", "on_validation_batch_start",
                  "on_validation_batch_end", "on_validation_epoch_end", "on_validation_end",
                  "on_before_zero_grad", "on_before_backward", "on_after_backward")


def weight_writers(trainer: pl.Trainer, module: pl.LightningModule) -> list[str]:
    """Code that runs between an optimizer step and the next and could change W in place: the module's
    own hooks, and callbacks other than Lightning's read-only ones (``EMAWeightAveraging`` swaps weights)."""
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities.model_helpers import is_overridden

    found = [f"{type(module).__name__}.{hook}" for hook in _BETWEEN_STEPS if is_overridden(hook, module)]
    for cb in trainer.callbacks:
        if type(cb).__name__ in _SAFE_CALLBACKS:
            continue
        found += [f"{type(cb).__name__}.{hook}" for hook in _BETWEEN_STEPS if is_overridden(hook, cb, Callback)]
    return found
