"""``budget-callback plan``: the forecast before any code runs."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from ..forecast.budgets import POLICIES
from ..forecast.engine import DEFAULT_MFU, Budgets, PlanInputs, SnapshotSpec, forecast
from ..forecast.gpus import GPUS
from ..forecast.memory import TrainSetup
from ..forecast.precision import OPTIMIZER_IMPLS, OPTIMIZERS, PRECISIONS, STRATEGIES
from ..forecast.report import render
from ..forecast.shapes import MLPS, NORMS, PRESETS, ModelShape, preset
from ..forecast.wandb_usage import LOG_MODEL_CHOICES, LoggingSpec
from ..snapshots.format import MAX_SNAPSHOTS_PER_FILE, SNAPSHOT_DTYPES
from ..units import parse_size


PROG = "budget-callback"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump, one prefix for the command and its subcommand
        self.exit(2, f"{PROG}: error: {message}\n")


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default, when it has one (a number, a choice; not None or a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default is None or action.default is False or \
                action.default == argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _snapshots_per_file(text: str) -> int:
    """The callback's own limit (``BudgetCallback(snapshots_per_file=...)``), so the plan refuses what it refuses."""
    value = _positive(text)
    if value > MAX_SNAPSHOTS_PER_FILE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SNAPSHOTS_PER_FILE:,} (one file holds them all in "
                                         f"host RAM while it fills), got {text!r}")
    return value


def _size(text: str) -> int:
    """Parsed by the callback's own ``parse_size`` from the text itself (``int()`` took digits it refuses)."""
    try:
        return parse_size(text, "size")
    except ValueError as err:
        why = "too large" if "at most" in str(err) else "must be a positive size" if "positive" in str(err) else \
            "must be a size such as 500MB, 12GB (powers of 1000) or 12GiB (powers of 1024)"
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise argparse.ArgumentTypeError(f"{why}, got {shown!r}") from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def _momentum(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0: no momentum buffer), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog=PROG, description="Forecast and guard the budgets of a Lightning run.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("plan", help="forecast memory, FLOPs, time, disk and W&B usage of a run", formatter_class=_Help,
                       description="Forecast memory, FLOPs, time, disk and W&B usage of a run before it starts.")
    model = p.add_argument_group("model", "--preset NAME, or all of --vocab-size --d-model --n-layer --n-head; "
                                          "with a preset, any flag below overrides its value")
    model.add_argument("--preset", choices=list(PRESETS), metavar="NAME", help="one of: " + ", ".join(PRESETS))
    model.add_argument("--model", metavar="MODULE:FACTORY",
                       help="your own model: a callable returning a LightningModule (or an nn.Module, trained with "
                            "--optimizer), built on the meta device and traced as the callback traces it at fit "
                            "start (needs --seq-len)")
    model.add_argument("--hf-config", metavar="PATH",
                       help="a Hugging Face config.json: its causal LM, no weights, no network (needs transformers)")
    model.add_argument("--batch", metavar="MODULE:FN",
                       help="with --model: fn(batch_size, seq_len) returns the batch (default: (x, y) token ids)")
    for flag, text in (("--vocab-size", "V"), ("--d-model", "D, the hidden size"), ("--n-layer", "transformer blocks"),
                       ("--n-head", "attention heads"), ("--n-kv-head", "key/value heads (default: --n-head)"),
                       ("--head-dim", "default: --d-model / --n-head"), ("--d-mlp", "default: 4 x --d-model"),
                       ("--n-ctx", "context length (default: --seq-len, else 1024)")):
        model.add_argument(flag, type=_positive, help=text)
    model.add_argument("--norm", choices=NORMS, help="default: layernorm")
    model.add_argument("--mlp", choices=MLPS, help="default: gelu")
    model.add_argument("--bias", action=argparse.BooleanOptionalAction, default=None, help="biases in linears")
    model.add_argument("--tied", action=argparse.BooleanOptionalAction, default=None, help="head tied to the embedding")
    model.add_argument("--learned-pos", action=argparse.BooleanOptionalAction, default=None,
                       help="learned position embedding (--no-learned-pos: rotary)")
    run = p.add_argument_group("run")
    run.add_argument("--batch-size", type=_positive, default=1, help="micro-batch per device")
    run.add_argument("--grad-accum", type=_positive, default=1, help="gradient accumulation steps")
    run.add_argument("--seq-len", type=_positive, help="default: the model's context length")
    run.add_argument("--steps", type=_positive, default=1000, help="optimizer steps")
    run.add_argument("--devices", type=_positive, default=1, help="devices per node")
    run.add_argument("--num-nodes", type=_positive, default=1, help="nodes")
    run.add_argument("--precision", choices=list(PRECISIONS), default="bf16-mixed", help="Lightning's precision")
    run.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="optimizer")
    run.add_argument("--momentum", type=_momentum, default=0.0, help="SGD momentum (0: no momentum buffer)")
    run.add_argument("--optimizer-impl", choices=OPTIMIZER_IMPLS, default="foreach", help="torch's implementation")
    run.add_argument("--strategy", choices=STRATEGIES, default="ddp", help="Lightning's strategy")
    run.add_argument("--flash-attention", action=argparse.BooleanOptionalAction, default=True,
                     help="attention without the T x T scores saved")
    run.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    run.add_argument("--keep-logits", action="store_true",
                     help="the training step holds the logits through backward (nanoGPT's train.py does); with "
                          "--compile: the compiled graph returns them")
    run.add_argument("--compile", action="store_true",
                     help="the training step is torch.compile'd (inductor, trainer.fit(torch.compile(model))): the "
                          "compiled partition's activations, modelled for GPT-2-style blocks")
    run.add_argument("--gpu", choices=list(GPUS), metavar="NAME", help="one of: " + ", ".join(GPUS))
    run.add_argument("--mfu", type=_fraction, default=DEFAULT_MFU, help="assumed model FLOPs utilisation")
    snap = p.add_argument_group("snapshots")
    snap.add_argument("--save-every", type=_positive, default=1, help="requested snapshot interval, optimizer steps")
    snap.add_argument("--snapshot-dtype", choices=list(SNAPSHOT_DTYPES), default="bfloat16", help="dtype of W on disk")
    snap.add_argument("--snapshots-per-file", type=_snapshots_per_file, default=1,
                      help=f"at most {MAX_SNAPSHOTS_PER_FILE:,}")
    snap.add_argument("--include-embedding", action="store_true", help="also record the input embedding E")
    log = p.add_argument_group("logging and checkpoints")
    log.add_argument("--log-every-n-steps", type=_positive, default=50, help="Lightning's logging cadence")
    log.add_argument("--train-metrics", type=_positive, default=1, help="scalars per train log row")
    log.add_argument("--eval-every", type=_positive, help="optimizer steps between evaluations (default: none)")
    log.add_argument("--eval-metrics", type=_positive, default=1, help="scalars per eval log row")
    log.add_argument("--checkpoint-every", type=_positive, help="optimizer steps between checkpoints (default: none)")
    log.add_argument("--keep-checkpoints", type=_positive, default=1, help="checkpoints kept (save_top_k)")
    log.add_argument("--log-model", choices=LOG_MODEL_CHOICES, default="none", help="WandbLogger(log_model=...)")
    bud = p.add_argument_group("budgets")
    bud.add_argument("--disk-budget", type=_size, help="e.g. 20GB or 20GiB (default: not checked)")
    bud.add_argument("--memory-budget", type=_size, help="per device (default: the --gpu's memory)")
    bud.add_argument("--wandb-budget", type=_size, help="e.g. 100GB (default: not checked)")
    bud.add_argument("--on-exceed", choices=POLICIES, default="downsample", help="what a failed budget does")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--check", action="store_true", help="exit 1 when the decision is abort")
    return parser


def _shape(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ModelShape:
    overrides = {k: getattr(args, k) for k in ("vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "head_dim",
                                               "d_mlp", "n_ctx", "norm", "mlp", "bias", "tied", "learned_pos")}
    if args.preset:
        return preset(args.preset, **overrides)
    missing = [f"--{k.replace('_', '-')}" for k in ("vocab_size", "d_model", "n_layer", "n_head") if overrides[k] is None]
    if missing:
        parser.error(f"give --preset NAME or all of --vocab-size --d-model --n-layer --n-head (missing {' '.join(missing)})")
    if overrides["n_ctx"] is None and args.seq_len:
        overrides["n_ctx"] = args.seq_len
    if overrides["norm"] == "rmsnorm":
        overrides.setdefault("norm_bias", False)
    return ModelShape(**{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    """``budget-callback plan``; a reader that closes stdout early (``| head``) ends it quietly with status 1."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not in a traceback at interpreter exit
    except BrokenPipeError:
        _stdout_to_devnull()
        return 1


def _stdout_to_devnull() -> None:
    """What https://docs.python.org/3/library/signal.html#note-on-sigpipe recommends: the output still
    buffered goes nowhere, so the flush at exit does not raise again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (captured): nothing to redirect
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model or args.hf_config:
        return _print(args, *_plan_model(args, parser))
    if args.batch:
        parser.error("--batch is the batch of --model or --hf-config: give one of them")
    try:
        inputs = _inputs(args, _shape(args, parser))
    except ValueError as err:
        parser.error(_flag_message(err))
    return _print(args, forecast(inputs), [])


def _print(args: argparse.Namespace, result, notes: list[str]) -> int:
    result.notes.extend(notes)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(render(result))
    return 1 if args.check and result.decision == "abort" else 0


def _plan_model(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """``--model`` / ``--hf-config``: the user's model measured as the callback measures it (imports torch)."""
    given = [f for f, v in (("--model", args.model), ("--hf-config", args.hf_config), ("--preset", args.preset),
                            ("--vocab-size", args.vocab_size), ("--d-model", args.d_model)) if v]
    if len(given) > 1:
        parser.error(f"give one model: {' and '.join(given)} were both given")
    if args.seq_len is None:
        parser.error("--seq-len is required with --model and --hf-config (the batch is --batch-size x --seq-len)")
    from dataclasses import replace

    from .model import ModelError, build_model, measure_planned

    try:
        stand_in = ModelShape(vocab_size=1, d_model=1, n_layer=1, n_head=1, n_ctx=args.seq_len, learned_pos=False)
        inputs = _inputs(args, stand_in, compile_modelled=False)
        planned = build_model(args)
        measured, shape, notes = measure_planned(planned, inputs)
        inputs = replace(inputs, shape=shape, setup=_optimizer_of(planned, inputs))
        analytic_only = [flag for flag, given in (("--activation-checkpointing", args.activation_checkpointing),
                                                  ("--keep-logits", args.keep_logits),
                                                  ("--no-flash-attention", not args.flash_attention)) if given]
        if analytic_only:  # settings of the analytic model: the traced step is the model's own code
            notes.append(f"{', '.join(analytic_only)} ignored: settings of the analytic model; the traced step is "
                         "your model's own code (checkpoint or keep logits there)")
            inputs = replace(inputs, setup=replace(inputs.setup, activation_checkpointing=False, keep_logits=False,
                                                   flash_attention=True))
    except ModelError as err:
        parser.error(str(err))
    except ValueError as err:
        parser.error(_flag_message(err))
    return forecast(inputs, measured), [f"model: {planned.description}", *notes]


def _optimizer_of(planned, inputs: PlanInputs) -> TrainSetup:
    """The setup with the optimizer the model configures (``--optimizer`` only where none was configured)."""
    from dataclasses import replace

    from ..lightning.inputs import describe_optimizer

    name, momentum, impl = describe_optimizer(planned.optimizers[0], inputs.gpu is not None)
    return replace(inputs.setup, optimizer=name, momentum=momentum, optimizer_impl=impl)


def _inputs(args: argparse.Namespace, shape: ModelShape, compile_modelled: bool = True) -> PlanInputs:
    """The run the flags describe; ``compile_modelled=False``: ``--compile`` is traced, not the analytic model."""
    return PlanInputs(
        shape=shape,
        setup=TrainSetup(args.batch_size, args.seq_len, args.grad_accum, args.devices, args.num_nodes, args.precision,
                         args.optimizer, args.momentum, args.optimizer_impl, args.strategy, args.flash_attention,
                         keep_logits=args.keep_logits, activation_checkpointing=args.activation_checkpointing,
                         compile=args.compile and compile_modelled),
        steps=args.steps,
        snapshot=SnapshotSpec(args.save_every, args.snapshot_dtype, args.snapshots_per_file, args.include_embedding),
        logging=LoggingSpec(args.log_every_n_steps, args.train_metrics, args.eval_every, args.eval_metrics,
                            checkpoint_every_n_steps=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                            log_model=args.log_model),
        budgets=Budgets(args.disk_budget, args.memory_budget, args.wandb_budget, args.on_exceed),
        gpu=args.gpu,
        mfu=args.mfu,
    )


def _flag_message(err: ValueError) -> str:
    """Turn ``\\`n_head\\``` into ``--n-head`` so the message names the flag the user typed."""
    text = str(err)
    for name in ("vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "head_dim", "d_mlp", "n_ctx", "seq_len",
                 "save_every_n_steps", "snapshots_per_file", "steps", "compile"):
        flag = {"save_every_n_steps": "save_every"}.get(name, name)
        text = text.replace(f"`{name}`", f"--{flag.replace('_', '-')}")
    return text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
