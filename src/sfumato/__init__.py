"""sfumato: Stable Diffusion from scratch in PyTorch.

    import sfumato
    pipe = sfumato.load("v1-5-pruned-emaonly.safetensors")
"""

from __future__ import annotations

from sfumato.config import PRESETS, ModelSpec
from sfumato.errors import CheckpointError, SfumatoError, UnknownModelError, UnsafePickleError

__version__ = "0.1.0"

__all__ = ["load", "PRESETS", "ModelSpec", "SfumatoError", "CheckpointError", "UnknownModelError",
           "UnsafePickleError", "MemoryOptions", "ControlUnit", "__version__"]


def __getattr__(name: str):  # noqa: ANN202 - lazy: importing sfumato stays light
    if name == "MemoryOptions":
        from sfumato.pipeline import MemoryOptions

        return MemoryOptions
    if name == "ControlUnit":
        from sfumato.adapters.controlnet import ControlUnit

        return ControlUnit
    raise AttributeError(f"module 'sfumato' has no attribute {name!r}")


def load(*args, **kwargs):  # noqa: ANN002, ANN003 - signature documented on sfumato.weights.load.load
    """Load a checkpoint (single file or diffusers folder); see :func:`sfumato.weights.load.load`."""
    from sfumato.weights.load import load as _load

    return _load(*args, **kwargs)
