"""A small transformer-style encoder block: attention, LayerNorm, GELU MLP, functional dropout."""

import math

import torch.nn.functional as F
from torch import nn


class EncoderBlock(nn.Module):
    """Pre-norm self-attention + MLP on (N, L, D) sequences.

    Its attention dropout reads ``self.training`` (``F.dropout(..., training=self.training)``),
    the pattern fx bakes into a graph: capture must keep it working in both modes.
    """

    def __init__(self, dim: int = 32, heads: int = 4, mlp_ratio: int = 2, attn_drop: float = 0.1):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        self.attn_drop = attn_drop

    def attention(self, x):
        n, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1)) / math.sqrt(dim // self.heads)
        weights = F.dropout(weights.softmax(dim=-1), self.attn_drop, training=self.training)
        return self.proj((weights @ v).transpose(1, 2).reshape(n, length, dim))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class TinyEncoder(nn.Module):
    """Two encoder blocks and a mean-pooled linear head: (N, L, D) → (N, classes)."""

    def __init__(self, dim: int = 32, depth: int = 2, num_classes: int = 5):
        super().__init__()
        self.blocks = nn.ModuleList(EncoderBlock(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


__all__ = ["EncoderBlock", "TinyEncoder"]
