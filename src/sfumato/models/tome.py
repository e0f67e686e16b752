"""Token merging for Stable Diffusion (ToMe; Bolya and Hoffman, "Token Merging for Fast Stable Diffusion",
CVPRW 2023): a fast path, off by default.

Before a transformer block's self-attention at the highest-resolution levels, the most redundant image
tokens are merged into similar ones by bipartite soft matching, attention runs over the fewer tokens, and
its output is copied back to every merged token ("unmerge"). Per block:

1. split the h x w grid into ``sy`` x ``sx`` cells; one token per cell (drawn from the generator, or the
   top-left one without) is a destination, the rest are sources;
2. each source's most cosine-similar destination is its match; the ``r = ratio * tokens`` sources with the
   most similar matches are merged (averaged) into them; the other sources stay;
3. after attention, every merged source takes its destination's output.

Only self-attention is merged (the paper's default and the best quality per saved FLOP): cross-attention
and the MLP are per-token and see every token. Merging changes the image; the speed gain grows with the
token count (attention is quadratic in it), so it is small at 256 px and larger at 512 px and up. Figures in
bench/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

__all__ = ["TokenMerging", "bipartite_merge", "token_merging", "active"]

Merge = Callable[[torch.Tensor], torch.Tensor]


def bipartite_merge(metric: torch.Tensor, h: int, w: int, r: int, *, sx: int = 2, sy: int = 2,
                    generator: torch.Generator | None = None) -> tuple[Merge, Merge]:
    """(merge, unmerge) for (B, h*w, C) tokens: ``merge`` averages ``r`` source tokens into their most
    similar destinations (by cosine similarity of ``metric``) -> (B, h*w - r, C); ``unmerge`` gives back
    (B, h*w, C), each merged source a copy of its destination's value."""
    b, n, _ = metric.shape
    if n != h * w:
        raise ValueError(f"bipartite_merge: {n} tokens are not a {h}x{w} grid")
    gh, gw = h // sy, w // sx
    dst_pos = torch.zeros(gh, gw, dtype=torch.long) if generator is None else \
        torch.randint(sy * sx, (gh, gw), generator=generator)
    # a (h, w) map: 1 where the token is its cell's destination; tokens outside whole cells are sources
    is_dst = torch.zeros(gh, gw, sy * sx, dtype=torch.bool)
    is_dst.scatter_(2, dst_pos.unsqueeze(-1), True)
    full = torch.zeros(h, w, dtype=torch.bool)
    full[: gh * sy, : gw * sx] = is_dst.view(gh, gw, sy, sx).transpose(1, 2).reshape(gh * sy, gw * sx)
    order = torch.argsort(full.flatten().to(torch.int8), stable=True)  # sources first, then destinations
    n_dst = int(full.sum())
    src_idx, dst_idx = order[: n - n_dst].to(metric.device), order[n - n_dst:].to(metric.device)
    r = min(r, n - n_dst)
    if r <= 0:
        return (lambda x: x), (lambda x: x)

    m = F.normalize(metric.float(), dim=-1)
    scores = m[:, src_idx] @ m[:, dst_idx].transpose(1, 2)  # (B, Ns, Nd)
    best, match = scores.max(dim=-1)  # each source's most similar destination
    ranked = best.argsort(dim=-1, descending=True)
    merged, kept = ranked[:, :r], ranked[:, r:]  # positions among the sources
    target = match.gather(1, merged)  # (B, r) destination positions among the destinations

    def merge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        src, dst = x[:, src_idx], x[:, dst_idx]
        keep = src.gather(1, kept.unsqueeze(-1).expand(-1, -1, c))
        moving = src.gather(1, merged.unsqueeze(-1).expand(-1, -1, c))
        dst = dst.scatter_reduce(1, target.unsqueeze(-1).expand(-1, -1, c), moving, reduce="mean", include_self=True)
        return torch.cat([keep, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        n_keep = kept.shape[1]
        keep, dst = x[:, :n_keep], x[:, n_keep:]
        out = x.new_empty(b, n, c)
        out[:, dst_idx] = dst
        src = x.new_empty(b, n - n_dst, c)
        src.scatter_(1, kept.unsqueeze(-1).expand(-1, -1, c), keep)
        src.scatter_(1, merged.unsqueeze(-1).expand(-1, -1, c), dst.gather(1, target.unsqueeze(-1).expand(-1, -1, c)))
        out[:, src_idx] = src
        return out

    return merge, unmerge


class TokenMerging:
    """One generation's token merging: ``ratio`` of each self-attention's tokens merged in the transformer
    blocks whose grid is at most ``max_downsample`` times smaller than the largest grid any transformer
    block of the network sees (1: only the highest-resolution attention level, the paper's default, which
    on SD 1.x/2.x is the latent's own resolution; SDXL and the built-in model have none there). Destinations are drawn from a generator seeded by ``seed`` (the
    paper's random choice, reproducible), or are each cell's top-left token when ``seed`` is None."""

    def __init__(self, ratio: float, *, max_downsample: int = 1, seed: int | None = 0, sx: int = 2,
                 sy: int = 2) -> None:
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"TokenMerging: ratio in [0, 1), got {ratio}")
        self.ratio, self.max_downsample, self.sx, self.sy = ratio, max_downsample, sx, sy
        self.generator = None if seed is None else torch.Generator("cpu").manual_seed(seed)
        self.top: int | None = None  # the largest grid of this network call (its first transformer block's)
        self.merged_blocks = 0  # blocks that merged, for tests

    def begin(self) -> None:
        """Called before each network call (the UNet's, with its ControlNets'): the first transformer block
        planned after it, at the highest attention resolution of the down path, sets the reference grid."""
        self.top = None

    def plan(self, x: torch.Tensor, h: int, w: int) -> tuple[Merge, Merge] | None:
        """(merge, unmerge) for a block's (B, h*w, C) tokens, or None where this level is not merged."""
        if self.top is None or h * w > self.top:
            self.top = h * w
        if self.ratio <= 0 or h * w * self.max_downsample**2 < self.top:
            return None
        self.merged_blocks += 1
        return bipartite_merge(x, h, w, int(h * w * self.ratio), sx=self.sx, sy=self.sy, generator=self.generator)


_ACTIVE: contextvars.ContextVar[TokenMerging | None] = contextvars.ContextVar("sfumato_tome", default=None)


@contextlib.contextmanager
def token_merging(tm: TokenMerging | None) -> Iterator[None]:
    """Within the block, the UNet's transformer blocks merge tokens as ``tm`` says (None: no merging)."""
    reset = _ACTIVE.set(tm)
    try:
        yield
    finally:
        _ACTIVE.reset(reset)


def active() -> TokenMerging | None:
    return _ACTIVE.get()
