"""int8 linear and convolution layers on the CPU's integer units (a fast path, off by default).

Inside :func:`int8_matmuls`, every ``F.linear`` and ``F.conv2d`` of float32 CPU tensors that is big enough
to gain runs as an int8 product on oneDNN's kernels (``torch.ops.onednn.qlinear_pointwise`` /
``qconv2d_pointwise``, the ones torch's own x86 int8 inference uses): the weight quantised once per output
channel (symmetric, 7 bits, kept in a per-pipeline :class:`Int8Weights` cache), the activation quantised
per call per tensor (asymmetric, 8 bits, from its min and max), accumulated in int32 and written back as
float32; no sum saturates (see ``WEIGHT_MAX``). Once packed, a float weight mapped from its checkpoint
gives its pages back (``weights.pages.release_tensors``), so int8 holds about a quarter of the float
layers' memory instead of adding to it. No module is replaced: the same weights serve the exact
path, a LoRA loaded or unloaded later gets its weights packed again (the cache is keyed by the weight
tensor and its version), and the mode covers whatever runs inside it (the UNet and ControlNets in the
spine; the autoencoder's decode when asked).

Measured on this machine (one thread): 1.5-2.7x float32's speed on SD-sized 3x3 convs, about 2x on big
projections. Small layers stay float32 (the UNet's 4-channel stem and head, the timestep MLP on two rows),
where int8 would cost accuracy for no time. The image changes: PSNR against the exact path is in
bench/RESULTS.md. Activations are quantised with ``torch.quantize_per_tensor`` (one fused pass; torch
marks quantized tensors deprecated, so a future torch may need another route): :func:`int8_available`
says whether this torch has what int8 needs, and the API refuses int8 with a clear message where not.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["Int8Weights", "int8_available", "int8_matmuls"]

# The kernels sum u8 x s8 products in pairs into int16 (``vpmaddubsw``), which saturates past 32767: with
# 8-bit activations (0..255) the weights get 7 bits, 255 * 63 * 2 = 32130. Measured on a 320-wide
# projection of Gaussian inputs: 1.3% relative RMS error, against 8% with 8-bit weights (saturated) and
# 2.0% with 7-bit activations and 8-bit weights (fbgemm's ``reduce_range`` choice).
WEIGHT_MAX = 63
# a layer gains from int8 when its product is big: fan-in and fan-out of at least 64 and 64+ rows
MIN_FEATURES = 64
MIN_ROWS = 64


def int8_available() -> bool:
    """True when this torch build has the oneDNN int8 CPU kernels int8 needs."""
    try:
        return all(hasattr(torch.ops.onednn, op) for op in
                   ("qlinear_prepack", "qlinear_pointwise", "qconv_prepack", "qconv2d_pointwise")) \
            and torch.backends.mkldnn.is_available()
    except Exception:  # noqa: BLE001 - any failure to look means "not available"
        return False


@dataclass
class _Packed:
    ref: weakref.ref
    version: int
    params: tuple[torch.Tensor, torch.Tensor]


@dataclass
class Int8Weights:
    """Packed int8 weights, one entry per float weight tensor, alive as long as that tensor is."""

    packed: dict[tuple, _Packed] = field(default_factory=dict)
    _keys: dict[int, set] = field(default_factory=dict)  # id(weight) -> its keys in ``packed``

    def __len__(self) -> int:
        return len(self.packed)

    def holds(self, weight: torch.Tensor) -> bool:
        """Whether ``weight`` (as it is now) has a packed copy: int8 reads the float weight then only for calls
        too small to gain (fewer than ``MIN_ROWS`` rows), which fault its pages in as they need them."""
        entries = (self.packed.get(key) for key in self._keys.get(id(weight), ()))
        return any(e is not None and e.ref() is weight and e.version == _version(weight) for e in entries)

    def get(self, weight: torch.Tensor, conv: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed weight, per-channel scales) of a linear (``conv`` None) or conv (stride, padding, dilation)."""
        key = (id(weight), conv)
        version = _version(weight)
        entry = self.packed.get(key)
        if entry is not None and entry.ref() is weight and entry.version == version:
            return entry.params
        params = _pack(weight, conv)
        self.packed[key] = _Packed(weakref.ref(weight, lambda _r, k=key, d=self.packed: d.pop(k, None)), version,
                                   params)
        self._keys.setdefault(id(weight), set()).add(key)
        # the float weight is not read while its packed copy serves: its pages mapped from the checkpoint
        # leave RAM (they come back from the page cache if the exact path runs again)
        from sfumato.weights.pages import release_tensors

        release_tensors([weight])
        return params


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter; they are never changed in place
        return -1


def _pack(weight: torch.Tensor, conv: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed int8 weight, per-output-channel scales): symmetric, 7 bits (-63..63), zero point 0."""
    w = weight.detach().float()
    out = w.shape[0]
    scale = (w.reshape(out, -1).abs().amax(dim=1) / WEIGHT_MAX).clamp_min(1e-12)
    q = torch.round(w / scale.reshape(-1, *([1] * (w.ndim - 1)))).clamp_(-WEIGHT_MAX, WEIGHT_MAX).to(torch.int8)
    if conv is None:
        return torch.ops.onednn.qlinear_prepack(q, None), scale
    stride, padding, dilation = conv
    return torch.ops.onednn.qconv_prepack(q, scale, 1.0, 0, stride, padding, dilation, 1, None), scale


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """Per-tensor asymmetric uint8 of an activation: (codes, scale, zero point), zero exactly representable."""
    lo, hi = torch.aminmax(x)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zp = min(255, max(0, round(-lo / scale)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notice for quantized tensors (one fused pass)
        codes = torch.quantize_per_tensor(x, scale, zp, torch.quint8).int_repr()
    return codes, scale, zp


def _pair(v) -> list[int] | None:
    if isinstance(v, int):
        return [v, v]
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return list(v)
    return None


def _plain(x: torch.Tensor, w: torch.Tensor) -> bool:
    """float32 CPU tensors and no gradient wanted (the int8 kernels have no backward)."""
    return (x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu"
            and w.device.type == "cpu" and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))


class _Int8Mode(TorchFunctionMode):
    def __init__(self, weights: Int8Weights) -> None:
        super().__init__()
        self.weights = weights
        self.calls = 0  # products run in int8 (tests check the mode reached the layers)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            out = self._linear(*args, **kwargs)
            if out is not None:
                return out
        elif func is F.conv2d:
            out = self._conv2d(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)

    def _linear(self, x, weight, bias=None):
        if not _plain(x, weight) or weight.shape[0] < MIN_FEATURES or weight.shape[1] < MIN_FEATURES \
                or x.numel() // x.shape[-1] < MIN_ROWS:
            return None
        self.calls += 1
        packed, scale = self.weights.get(weight, None)
        codes, x_scale, x_zp = _quantize(x.reshape(-1, x.shape[-1]))
        out = torch.ops.onednn.qlinear_pointwise(codes, x_scale, x_zp, packed, scale, _zeros(scale), _bias(bias),
                                                 1.0, 0, torch.float32, "none", [], "")
        return out.reshape(*x.shape[:-1], weight.shape[0])

    def _conv2d(self, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
        if (groups != 1 or stride is None or padding is None or dilation is None or x.ndim != 4
                or not _plain(x, weight) or weight.shape[0] < MIN_FEATURES
                or weight[0].numel() < MIN_FEATURES or x.shape[0] * x.shape[2] * x.shape[3] < MIN_ROWS):
            return None
        self.calls += 1
        packed, scale = self.weights.get(weight, (tuple(stride), tuple(padding), tuple(dilation)))
        codes, x_scale, x_zp = _quantize(x.contiguous())
        out = torch.ops.onednn.qconv2d_pointwise(codes, x_scale, x_zp, packed, scale, _zeros(scale), _bias(bias),
                                                 stride, padding, dilation, 1, 1.0, 0, torch.float32, "none", [], "")
        # oneDNN answers channels-last; the float layers after it (and their weights) are laid out NCHW
        return out.contiguous()


def _zeros(scale: torch.Tensor) -> torch.Tensor:
    return torch.zeros(scale.shape, dtype=torch.int64)


def _bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach().float()


@contextlib.contextmanager
def int8_matmuls(weights: Int8Weights) -> Iterator[_Int8Mode]:
    """Within the block, big float32 CPU linears and convs run in int8 (see the module docstring); the
    packed weights are kept in ``weights`` for the next call."""
    with _Int8Mode(weights) as mode:
        yield mode
