"""Shared building blocks: the attention backend, normalisation layers and meta-device construction.

Attention is ``torch.nn.functional.scaled_dot_product_attention`` (exact softmax attention); with
``upcast`` the scores are computed in fp32 (SD 2.x overflows in fp16 otherwise).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *, upcast: bool = False) -> torch.Tensor:
    """Multi-head attention over (B, L, heads*d) projections -> (B, Lq, heads*d)."""
    b, lq, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, H, L, d)
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v)
    return out.to(dtype).transpose(1, 2).reshape(b, lq, inner)


def group_norm(channels: int, groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=eps, affine=True)


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """Build modules without allocating or randomly initialising weights; load with ``assign=True``."""
    with torch.device("meta"):
        yield
