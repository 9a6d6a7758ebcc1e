"""Tests for examples/corpus.py. The examples directory is not a package, so
the module is loaded from its file path."""

import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "examples" / "corpus.py"
_spec = importlib.util.spec_from_file_location("examples_corpus", _PATH)
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)


@pytest.fixture(scope="module")
def loaded():
    return corpus.load_corpus(vocab_size=10_000)


def test_tokenize_lowercases_and_splits_punctuation():
    assert corpus.tokenize("To be, or NOT to be: that's the question!") == [
        "to", "be", ",", "or", "not", "to", "be", ":", "that's", "the",
        "question", "!",
    ]


def test_build_vocab_order_and_padding():
    tokens = ["b", "a", "c", "a", "b", "d", "a"]
    # a:3, b:2, then c and d tie at 1 and are sorted alphabetically
    assert corpus.build_vocab(tokens, 8) == [
        "<unk>", "a", "b", "c", "d", "<unused_0>", "<unused_1>", "<unused_2>",
    ]
    assert corpus.build_vocab(tokens, 3) == ["<unk>", "a", "b"]
    assert corpus.build_vocab(tokens, 1) == ["<unk>"]


@pytest.mark.parametrize("size", [1, 50, 10_000, 20_000])
def test_vocab_size_is_exact(size):
    vocab = corpus.build_vocab(corpus.tokenize("the cat sat on the mat ."), size)
    assert len(vocab) == size
    assert len(set(vocab)) == size
    assert vocab[0] == "<unk>"


def test_loaded_corpus(loaded):
    ids, vocab = loaded
    assert len(vocab) == 10_000
    assert vocab[0] == "<unk>"
    assert len(set(vocab)) == len(vocab)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.numel() > 10_000
    assert int(ids.min()) >= 0 and int(ids.max()) < len(vocab)
    # Every id decodes back to the token it came from, unless it is <unk>.
    text = corpus.DEFAULT_PATH.read_text(encoding="utf-8")
    tokens = corpus.tokenize(text)
    assert len(tokens) == ids.numel()
    assert all(vocab[i] in (tok, "<unk>") for i, tok in zip(ids[:2000].tolist(), tokens))


def test_small_vocab_maps_rest_to_unk(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("a a a b b c", encoding="utf-8")
    ids, vocab = corpus.load_corpus(vocab_size=3, path=path)
    assert vocab == ["<unk>", "a", "b"]
    assert ids.tolist() == [1, 1, 1, 2, 2, 0]


@pytest.mark.parametrize("n, seq_len", [(101, 10), (100, 10), (11, 10), (10, 10), (1, 1), (57, 7)])
def test_windows_length_formula(n, seq_len):
    ds = corpus.TokenWindows(torch.arange(n), seq_len)
    assert len(ds) == (n - 1) // seq_len


def test_windows_shifted_by_one(loaded):
    ids, _ = loaded
    seq_len = 32
    ds = corpus.TokenWindows(ids, seq_len)
    assert len(ds) == (len(ids) - 1) // seq_len
    for i in (0, 1, len(ds) // 2, len(ds) - 1):
        x, y = ds[i]
        assert x.shape == y.shape == (seq_len,)
        assert torch.equal(x, ids[i * seq_len : (i + 1) * seq_len])
        assert torch.equal(y, ids[i * seq_len + 1 : (i + 1) * seq_len + 1])
        assert torch.equal(x[1:], y[:-1])


def test_windows_are_non_overlapping_and_bounded():
    ds = corpus.TokenWindows(torch.arange(25), 4)
    assert len(ds) == 6
    xs = [ds[i][0].tolist() for i in range(len(ds))]
    assert xs[0] == [0, 1, 2, 3] and xs[1] == [4, 5, 6, 7]
    assert ds[-1][1].tolist() == [21, 22, 23, 24]
    with pytest.raises(IndexError):
        ds[len(ds)]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch[0].shape == (3, 4) and batch[1].shape == (3, 4)
