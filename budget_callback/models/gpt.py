"""A small reference transformer built from a :class:`ModelShape`.

GPT-2 style (nanoGPT ``model.py``) or LLaMA/Gemma style (RMSNorm, gated MLP,
grouped-query attention, rotary positions). Used by the tests (every preset is
built on the ``meta`` device and counted), by the example run, and by the
callback, which recognises ``module.shape`` and uses the analytic forecast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..forecast.shapes import ModelShape


def _norm(shape: ModelShape) -> nn.Module:
    if shape.norm == "rmsnorm":
        return nn.RMSNorm(shape.d_model, eps=1e-6)
    return nn.LayerNorm(shape.d_model, bias=shape.norm_bias)


def _rotary(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding on (B, H, T, hd); no parameters."""
    T, hd = x.shape[-2], x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
    angles = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), inv)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.shape = shape
        self.qkv = nn.Linear(shape.d_model, shape.q_dim + 2 * shape.kv_dim, bias=shape.bias)
        self.proj = nn.Linear(shape.q_dim, shape.d_model, bias=shape.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shape
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([s.q_dim, s.kv_dim, s.kv_dim], dim=-1)
        q = q.view(B, T, s.n_head, s.hd).transpose(1, 2)
        k = k.view(B, T, s.kv_heads, s.hd).transpose(1, 2)
        v = v.view(B, T, s.kv_heads, s.hd).transpose(1, 2)
        if not s.learned_pos:
            q, k = _rotary(q), _rotary(k)
        if s.kv_heads != s.n_head:
            rep = s.n_head // s.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, s.q_dim))


class MLP(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.gated = shape.mlp == "gated"
        n_in = 2 if self.gated else 1
        self.fc = nn.Linear(shape.d_model, n_in * shape.mlp_hidden, bias=shape.bias)
        self.proj = nn.Linear(shape.mlp_hidden, shape.d_model, bias=shape.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.fc(x).chunk(2, dim=-1)
            return self.proj(F.silu(gate) * up)
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.ln_1, self.attn = _norm(shape), Attention(shape)
        self.ln_2, self.mlp = _norm(shape), MLP(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer; ``forward(idx, targets=None) -> (logits, loss)``."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.shape = shape
        self.wte = nn.Embedding(shape.vocab_size, shape.d_model)
        self.wpe = nn.Embedding(shape.n_ctx, shape.d_model) if shape.learned_pos else None
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.n_layer))
        self.ln_f = _norm(shape)
        self.lm_head = nn.Linear(shape.d_model, shape.vocab_size, bias=False)
        if shape.tied:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.device.type != "meta":
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

