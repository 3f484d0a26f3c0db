"""SigLIP's attention pooling (timm's `global_pool='map'`, AttentionPoolLatent) on a stream
that may be pruned.

A learned latent query attends over the patch tokens; the result goes through an output
projection and a residual MLP (with its LayerNorm), and is the pooled feature vector. Names
and order are timm's (`attn_pool.latent`, `.q`, `.kv`, `.proj`, `.norm`, `.mlp.fc1/fc2`), so
timm's weights load as they are and the logits are timm's.

Its sides that face the residual stream follow the stream's embedding gate, as a block's do:
the latent (the query's input, as wide as the stream) and the output projection and the MLP's
second layer produce stream channels, q, kv and the MLP's first layer read them, and its norm
takes its statistics over the live channels. Its MLP's hidden units are a unit kind of their
own ("pool_mlp", gated as a block's MLP). Its attention width (`pool_dim`: q, k and v per
head) is not a prunable unit and keeps its width (`units.UNPRUNED`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .revit import Mlp, StreamNorm, scaled


class AttentionPool(nn.Module):
    def __init__(self, embed_dim: int, pool_dim: int, num_heads: int, mlp_dim: int,
                 ln_eps: float, act: str = "gelu") -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, pool_dim // num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.q = nn.Linear(embed_dim, pool_dim)
        self.kv = nn.Linear(embed_dim, 2 * pool_dim)
        self.proj = nn.Linear(pool_dim, embed_dim)
        self.norm = StreamNorm(embed_dim, eps=ln_eps)
        self.mlp = Mlp(embed_dim, mlp_dim, act=act)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, E) the patch tokens -> (B, E); gate: the stream's embedding gate (as the
        final norm sees it), on the latent, the output's channels and the norm."""
        B, N, _ = x.shape
        H, d = self.num_heads, self.head_dim
        latent = self.latent if gate is None else self.latent * gate
        # a copy, not an expanded view: torch's module tracker (FlopCounterMode) refuses a
        # no-grad view of a parameter as a module's input
        q = self.q(latent.repeat(B, 1, 1)).reshape(B, 1, H, d).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, 1, H * d)
        if gate is None:
            x = self.proj(x)
        else:
            weight, bias = scaled(self.proj.weight, self.proj.bias, gate)
            x = F.linear(x, weight, bias)
        x = x + self.mlp(self.norm(x, gate), gate)
        return x[:, 0]
