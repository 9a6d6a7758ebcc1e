"""A small word-level text corpus for the examples.

The text lives in ``examples/data/corpus.txt``, a public-domain English text of
about 165 KB. ``examples/data/README.md`` lists the works it contains.

The example model has a fixed vocabulary of 10,000 entries. This corpus has
fewer distinct tokens than that, so :func:`build_vocab` pads the vocabulary
with ``"<unused_N>"`` entries. The ids of those entries never appear in the
data. Their embedding and output rows get no direct signal from the data,
and they are the "rare tokens" whose training dynamics we want to study.

Uses only the standard library and ``torch``::

    ids, vocab = load_corpus()
    dataset = TokenWindows(ids, seq_len=64)
    x, y = dataset[0]          # y is x shifted left by one token
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import Dataset

UNK = "<unk>"
DEFAULT_PATH = Path(__file__).resolve().parent / "data" / "corpus.txt"

# A word is a run of letters or digits, and may contain inner apostrophes
# ("o'er", "don't", "nature's"). Any other non-space character is a
# punctuation token of its own. Underscores are dropped.
_TOKEN_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Split ``text`` into lowercase word tokens and punctuation tokens.

    >>> tokenize("To be, or not to be: that's the question!")
    ['to', 'be', ',', 'or', 'not', 'to', 'be', ':', "that's", 'the', 'question', '!']
    """
    return _TOKEN_RE.findall(text.lower())


def build_vocab(tokens: list[str], vocab_size: int) -> list[str]:
    """Build a vocabulary of exactly ``vocab_size`` entries.

    Index 0 is ``"<unk>"``. The tokens follow, most frequent first, with
    ties broken alphabetically, and the list is cut to ``vocab_size``
    entries. If there are not enough distinct tokens, the list is padded
    with ``"<unused_0>"``, ``"<unused_1>"``, ... so that
    ``len(vocab) == vocab_size``.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    counts = Counter(tokens)
    counts.pop(UNK, None)  # "<unk>" always has index 0
    ranked = sorted(counts, key=lambda tok: (-counts[tok], tok))
    vocab = [UNK] + ranked[: vocab_size - 1]
    vocab += [f"<unused_{n}>" for n in range(vocab_size - len(vocab))]
    return vocab


def load_corpus(
    vocab_size: int = 10_000, path: str | Path | None = None
) -> tuple[torch.Tensor, list[str]]:
    """Read and tokenize the corpus, and build its vocabulary.

    Returns ``(ids, vocab)``. ``ids`` is a 1-D ``torch.long`` tensor of
    token ids. Tokens that did not make it into the vocabulary map to 0
    (``"<unk>"``). ``path`` defaults to ``data/corpus.txt`` next to this
    file.
    """
    path = DEFAULT_PATH if path is None else Path(path)
    tokens = tokenize(path.read_text(encoding="utf-8"))
    vocab = build_vocab(tokens, vocab_size)
    index = {tok: i for i, tok in enumerate(vocab)}
    ids = torch.tensor([index.get(tok, 0) for tok in tokens], dtype=torch.long)
    return ids, vocab


class TokenWindows(Dataset):
    """Non-overlapping next-token-prediction windows over a 1-D id tensor.

    Item ``i`` is ``(x, y)`` with ``x = ids[i*seq_len : (i+1)*seq_len]`` and
    ``y = ids[i*seq_len + 1 : (i+1)*seq_len + 1]``, so ``y`` is ``x``
    shifted by one token. There are ``(len(ids) - 1) // seq_len`` windows.
    The ``- 1`` leaves room for the target of the last input token.
    """

    def __init__(self, ids: torch.Tensor, seq_len: int):
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.ids = ids
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.ids) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"window index out of range (len={n})")
        start = i * self.seq_len
        x = self.ids[start : start + self.seq_len]
        y = self.ids[start + 1 : start + self.seq_len + 1]
        return x, y


if __name__ == "__main__":
    text = DEFAULT_PATH.read_text(encoding="utf-8")
    tokens = tokenize(text)
    counts = Counter(tokens)
    print(f"tokens:          {len(tokens):,}")
    print(f"distinct tokens: {len(counts):,}")
    print("10 most frequent:")
    for tok in build_vocab(tokens, 11)[1:]:
        print(f"  {tok!r:>8}  {counts[tok]:,}")
