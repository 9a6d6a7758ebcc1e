"""Finding W (and E) in models no one here wrote, as (vocab, hidden)."""

import pytest
import torch
from torch import nn

from budget_callback.lightning.locate import find_embedding, find_unembedding, is_tied
from budget_callback.models.gpt import GPT
from budget_callback.forecast.shapes import ModelShape
from helpers import LensLM, LlamaLM


class HFStyle(nn.Module):
    """Hugging Face's contract: get_input_embeddings / get_output_embeddings."""

    def __init__(self):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(30, 4)
        self.cls = nn.Linear(4, 30, bias=False)

    def get_input_embeddings(self):
        return self.transformer.wte

    def get_output_embeddings(self):
        return self.cls


class NoEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


@pytest.mark.parametrize("module, name, shape, transposed", [
    (GPT(ModelShape(30, 4, 1, 1, n_ctx=8, tied=False)), "lm_head.weight", (30, 4), False),
    (LensLM(vocab=40, d=6), "W_U", (40, 6), True),  # TransformerLens stores (d_model, d_vocab)
    (LlamaLM(vocab=64, d=16), "output.weight", (64, 16), False),
    (LlamaLM(vocab=64, d=16, head="decoder"), "decoder.weight", (64, 16), False),
    (LlamaLM(vocab=64, d=16, head="to_logits"), "to_logits.weight", (64, 16), False),  # found by its shape
    (HFStyle(), "cls.weight", (30, 4), False),
])
def test_auto_detection(module, name, shape, transposed):
    w = find_unembedding(module)
    assert w.description == f"parameter {name!r}" and w.shape() == shape and w.transposed is transposed
    assert w.matrix().shape == shape


def test_tying_is_detected_by_storage():
    tied = GPT(ModelShape(30, 4, 1, 1, n_ctx=8, tied=True))
    untied = GPT(ModelShape(30, 4, 1, 1, n_ctx=8, tied=False))
    assert is_tied(find_unembedding(tied), find_embedding(tied))
    assert not is_tied(find_unembedding(untied), find_embedding(untied))


def test_explicit_name_callable_and_errors():
    model = LensLM(vocab=40, d=6)
    assert find_unembedding(model, "mix.weight").shape() == (6, 6)
    assert find_unembedding(model, lambda m: m.W_U.t()).matrix().shape == (40, 6)
    with pytest.raises(ValueError, match="not found; parameters with 2-D shapes: W_E, W_U, mix.weight"):
        find_unembedding(model, "nope")
    with pytest.raises(ValueError, match="tried get_output_embeddings"):
        find_unembedding(NoEmbedding())
    with pytest.raises(ValueError, match="must return a 2-D tensor"):
        find_unembedding(model, lambda m: torch.zeros(3)).matrix()
