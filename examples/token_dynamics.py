"""How did W's rows move? Norm and cosine-to-first over the snapshot series.

Reads the snapshots of ``examples/train_tiny_gpt.py`` with ``SnapshotReader``
(a token's row at every step, read lazily) and prints, for the most frequent
and some never-seen tokens, the row norm over steps and the cosine similarity
to the first snapshot. Logs the same as W&B line plots (offline without an
API key) unless ``--no-wandb``.

    python examples/token_dynamics.py --snapshots runs/tiny-gpt/snapshots
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import DEFAULT_PATH, build_vocab, tokenize  # noqa: E402

from budget_callback import SnapshotReader  # noqa: E402


def token_stats(reader: SnapshotReader, token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm per step, cosine to the first snapshot per step) of W's row ``token_id``."""
    rows = reader.trajectory(token_id).float()
    norms = rows.norm(dim=1)
    cosine = torch.nn.functional.cosine_similarity(rows, rows[:1].expand_as(rows), dim=1)
    return norms, cosine


def pick_tokens(vocab: list[str], n: int) -> list[tuple[str, int, int]]:
    counts = Counter(tokenize(DEFAULT_PATH.read_text(encoding="utf-8")))
    frequent = [(vocab[i], i, counts[vocab[i]]) for i in range(1, 1 + n)]
    rare = [(vocab[i], i, counts.get(vocab[i], 0)) for i in range(len(vocab) - n, len(vocab))]
    return frequent + rare


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--snapshots", default="runs/tiny-gpt/snapshots", help="the BudgetCallback snapshot_dir")
    p.add_argument("--tokens", type=int, default=5, help="how many frequent and how many rare tokens")
    p.add_argument("--no-wandb", action="store_true")
    args = p.parse_args(argv)
    if not Path(args.snapshots).is_dir():
        p.error(f"--snapshots: {args.snapshots!r} is not a directory; run examples/train_tiny_gpt.py first")
    reader = SnapshotReader(args.snapshots)
    if len(reader) < 2:
        p.error(f"--snapshots: {len(reader)} snapshot(s) in {args.snapshots!r}; need at least 2")
    vocab_size = reader.manifest["vocab_size"]
    vocab = build_vocab(tokenize(DEFAULT_PATH.read_text(encoding="utf-8")), vocab_size)
    print(f"{len(reader)} snapshots, steps {reader.steps[0]}..{reader.steps[-1]}, W is "
          f"{vocab_size} x {reader.manifest['hidden_dim']} {reader.manifest['dtype']}")
    print(f"{'token':>14} {'id':>6} {'count':>7} {'norm first':>11} {'norm last':>10} {'cos(first, last)':>17}")
    curves = {}
    for token, token_id, count in pick_tokens(vocab, args.tokens):
        norms, cosine = token_stats(reader, token_id)
        curves[token] = (norms, cosine)
        print(f"{token:>14} {token_id:>6} {count:>7} {norms[0]:>11.4f} {norms[-1]:>10.4f} {cosine[-1]:>17.4f}")
    if not args.no_wandb:
        log_to_wandb(reader, curves)
    return 0


def log_to_wandb(reader: SnapshotReader, curves: dict) -> None:
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a dependency
        return
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    run = wandb.init(project="budget-callback-token-dynamics", mode=mode,
                     dir=str(Path(reader.directory).parent), config={"snapshots": str(reader.directory)})
    steps = list(reader.steps)
    for name, index in (("norm", 0), ("cosine_to_first", 1)):
        run.log({f"token_dynamics/{name}": wandb.plot.line_series(
            xs=steps, ys=[curves[t][index].tolist() for t in curves], keys=list(curves),
            title=f"W row {name.replace('_', ' ')} over steps", xname="optimizer step")})
    run.finish()


if __name__ == "__main__":
    sys.exit(main())
