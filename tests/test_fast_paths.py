"""Fast paths (issue 7), off by default, each checked against the exact path within its stated bound.

DeepCache (``deepcache=N``): the whole UNet on every N-th call, the shallow blocks only in between."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sfumato
from sfumato.config import UNetConfig
from sfumato.errors import InvalidParameterError
from sfumato.metadata import params_from_infotext
from sfumato.models.unet import StepCache, UNetModel

CFG = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(2, 2), transformer_depth=(1, 1),
                 transformer_depth_middle=1, num_heads=2, context_dim=16)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNetModel(CFG).eval()


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500, 500]), torch.randn(2, 7, 16, generator=g)


@torch.no_grad()
@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_cached_call_reuses_the_feature_at_the_right_place(unet, depth):
    """Calling again on the input that filled the cache must give the full call's output exactly: the kept
    feature enters the output blocks where the deep path's own output would. The cached call runs
    neither the middle block nor the deep input blocks."""
    x, t, ctx = _inputs(1)
    full = unet(x, t, context=ctx)
    cache = StepCache(interval=2, depth=depth)
    first = unet(x, t, context=ctx, cache=cache)
    ran = []
    hooks = [m.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, m in enumerate(b[0] for b in unet.input_blocks)]
    hooks.append(unet.middle_block[0].register_forward_hook(lambda *a: ran.append("mid")))
    try:
        second = unet(x, t, context=ctx, cache=cache)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(first, full)
    assert torch.equal(second, full), f"depth {depth}: max|diff| {(second - full).abs().max():.3g}"
    assert ran == list(range(depth + 1)), ran
    assert (cache.calls, cache.full_calls) == (2, 1)


@torch.no_grad()
def test_cache_interval_and_shape_changes(unet):
    """Interval 3: calls 0, 3, 6 are full; a new input differs from the full call's result (the deep part
    is stale) but a batch-size change forces a full call; interval 1 is the plain UNet."""
    cache = StepCache(interval=3)
    for seed in range(7):
        x, t, ctx = _inputs(seed)
        out = unet(x, t, context=ctx, cache=cache)
        if seed in (1, 2):
            assert not torch.equal(out, unet(x, t, context=ctx))
    assert (cache.calls, cache.full_calls) == (7, 3)
    x, t, ctx = _inputs(9)
    unet(x[:1], t[:1], context=ctx[:1], cache=cache)
    assert cache.full_calls == 4
    plain = StepCache(interval=1)
    assert torch.equal(unet(x, t, context=ctx, cache=plain), unet(x, t, context=ctx))
    with pytest.raises(ValueError, match="interval"):
        StepCache(interval=0)


def test_deepcache_generation_stays_near_the_exact_image():
    """On the built-in model, 20 Euler steps: DeepCache every 2nd step >= 35 dB PSNR and every 3rd step
    >= 30 dB against the exact image (measured 41.5 and 33.3 dB at depth 1); the setting is recorded in
    the infotext and read back."""
    pipe = sfumato.load()
    prompt = "a large red circle on the left, white background"
    exact = np.asarray(pipe.generate(prompt, seed=3).images[0], dtype=np.float64)
    for n, bound in ((2, 35.0), (3, 30.0)):
        res = pipe.generate(prompt, seed=3, deepcache=n)
        got = np.asarray(res.images[0], dtype=np.float64)
        psnr = 10 * np.log10(255**2 / ((got - exact) ** 2).mean())
        assert psnr >= bound, f"deepcache={n}: {psnr:.1f} dB < {bound}"
        text = res.infotexts[0]
        assert f"DeepCache: {n}" in text and "DeepCache depth: 1" in text
        back = params_from_infotext(text)
        assert (back.deepcache, back.deepcache_depth) == (n, 1)
    assert "DeepCache" not in pipe.generate(prompt, seed=3, steps=2).infotexts[0]


@pytest.mark.parametrize("kw,match", [(dict(deepcache=0), "deepcache=0 is out of range"),
                                      (dict(deepcache=2, deepcache_depth=-1), "deepcache_depth=-1")])
def test_bad_deepcache_values_are_refused(kw, match):
    pipe = sfumato.load()
    with pytest.raises(InvalidParameterError, match=match):
        pipe.generate("a red circle", **kw)
