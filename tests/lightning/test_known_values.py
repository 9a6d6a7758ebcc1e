"""Questions about values known without the data are answered in the trace; questions about the data are not."""

import warnings

import pytest
import torch
from torch import nn

from budget_callback.lightning.known_values import KnownValues
from budget_callback.lightning.torch_internals import FakeTensorMode
from budget_callback.lightning.tracing import trace_training_step_memory


def _trace(module, batch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trace_training_step_memory(module, batch, lambda m, b: m(b))


class CausalCheck(nn.Module):
    """Asks, as ``nn.Transformer`` does, whether a mask it built from shapes is causal, and branches on it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        T = x.shape[1]
        mask = torch.triu(torch.ones(T, T), diagonal=1)
        mask = mask.masked_fill(mask == 1, float("-inf"))
        causal = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
        is_causal = bool((mask == causal).all())
        h = self.proj(x)
        if is_causal:  # the branch a real step takes
            h = nn.functional.scaled_dot_product_attention(h, h, h, is_causal=True)
        return h.square().mean()


def test_a_question_about_a_mask_built_from_shapes_is_answered():
    traced = _trace(CausalCheck(), torch.randn(2, 8, 16))
    assert traced["values_answered"] >= 1 and traced["activations_bytes"] > 0


class AsksAboutTheData(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        h = self.proj(x)
        if (x > 0).any():  # depends on the batch: not known before the step runs
            h = h * 2
        return h.square().mean()


def test_a_question_about_the_data_is_not_answered():
    with pytest.raises(Exception) as caught:
        _trace(AsksAboutTheData(), torch.randn(2, 8, 16))
    from budget_callback.lightning.torch_internals import is_data_dependent_error

    assert is_data_dependent_error(caught.value)


def test_a_buffer_is_known_from_a_private_copy_and_random_ops_are_not_known():
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    known = KnownValues(fake_mode)
    real = torch.tensor([1.0, 2.0, 3.0])
    with fake_mode:
        fake = torch.empty(3)
    known.know(fake, real)
    state = torch.get_rng_state()
    with fake_mode, known:
        fake.add_(1)  # known + known: the private copy follows, the real buffer does not
        total = float(fake.sum())
        drawn = torch.rand(3)
        with pytest.raises(Exception):
            float(drawn.sum())  # a random tensor has no known value
    assert total == 9.0 and real.tolist() == [1.0, 2.0, 3.0]
    assert torch.equal(torch.get_rng_state(), state)  # nothing was drawn from the real generator
