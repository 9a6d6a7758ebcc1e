"""Train a tiny GPT on the CPU with BudgetCallback snapshotting W every step.

The model is the data-rate calculator's shape (vocab 10,000, hidden 64,
2 layers, 2 heads; sequences of 64 tokens, 16 per batch) on a public-domain
corpus shipped in ``examples/data``.
W&B runs offline unless ``WANDB_API_KEY`` is set (or ``--no-wandb``).

    python examples/train_tiny_gpt.py                       # 300 steps, snapshots every step
    python examples/train_tiny_gpt.py --steps 1000 --disk-budget 200MB --save-every 1
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import TokenWindows, load_corpus  # noqa: E402

from budget_callback import BudgetCallback, SnapshotReader  # noqa: E402
from budget_callback.forecast.shapes import preset  # noqa: E402
from budget_callback.models.gpt import GPT  # noqa: E402


class TinyGPT(L.LightningModule):
    def __init__(self, seq_len: int, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = GPT(preset("gpt2-tiny", n_ctx=seq_len))

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self.model(x, y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--save-every", type=int, default=1, help="requested snapshot interval in steps")
    p.add_argument("--snapshot-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--snapshots-per-file", type=int, default=1)
    p.add_argument("--disk-budget", default=None, help="e.g. 200MB or 1GiB (default: free space)")
    p.add_argument("--on-exceed", default="downsample", choices=["downsample", "abort", "warn"])
    p.add_argument("--out", default="runs/tiny-gpt", help="output directory (snapshots, logs)")
    p.add_argument("--no-wandb", action="store_true", help="log to CSV only")
    return p.parse_args(argv)


def make_logger(args, out: Path):
    if args.no_wandb:
        return L.pytorch.loggers.CSVLogger(out, name="csv")
    from lightning.pytorch.loggers import WandbLogger

    offline = not os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "dryrun")
    return WandbLogger(project="budget-callback-tiny-gpt", save_dir=str(out), offline=offline)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ids, vocab = load_corpus(vocab_size=10_000)
    loader = DataLoader(TokenWindows(ids, args.seq_len), batch_size=args.batch_size, shuffle=True, drop_last=True)
    budget = BudgetCallback(
        snapshot_dir=out / "snapshots",
        save_every_n_steps=args.save_every,
        snapshot_dtype=args.snapshot_dtype,
        snapshots_per_file=args.snapshots_per_file,
        include_embedding=True,  # tied in this model: stored once
        disk_budget=args.disk_budget,
        on_exceed=args.on_exceed,
        overwrite=True,  # the example may be run again into the same folder
    )
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=1,
        logger=make_logger(args, out),
        callbacks=[budget],
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=str(out),
    )
    logger = trainer.logger
    trainer.fit(TinyGPT(args.seq_len), loader)
    run_file = None
    if not args.no_wandb:
        import wandb

        run_dir = Path(logger.experiment.dir).parent
        wandb.finish()  # flush the offline run before the final lines
        run_file = next(run_dir.glob("run-*.wandb"), None)
    projected, actual = budget.projected_bytes, budget.bytes_written
    print(f"\nRead them: python examples/token_dynamics.py --snapshots {budget.snapshot_dir}")
    if run_file is not None:
        forecast, size = budget.forecast.wandb["run_file_bytes"], run_file.stat().st_size
        print(f"W&B run file: forecast {forecast:,} B (console output {budget.forecast.wandb['console_bytes']:,} B), "
              f"actual {size:,} B ({(forecast - size) / size:+.1%})")
    # the summary, last: what a newcomer reads when the run ends
    print(f"Projected vs actual: {len(SnapshotReader(budget.snapshot_dir))} snapshots every "
          f"{budget.save_every_n_steps} step(s): projected {projected:,} B, actual {actual:,} B, "
          f"difference {actual - projected:+,} B", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
