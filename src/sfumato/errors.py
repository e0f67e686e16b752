"""sfumato's exceptions: every failure a user can cause is one of these, raised at the boundary
with a message naming the value (file, key, parameter) and what is allowed."""

from __future__ import annotations


class SfumatoError(Exception):
    """Base class of every error sfumato raises on purpose."""


class CheckpointError(SfumatoError):
    """A checkpoint file or folder cannot be read or does not match what it claims to be."""


class UnsafePickleError(CheckpointError):
    """A ``.ckpt``/``.pt`` pickle asked for something other than tensors and plain containers."""


class UnknownModelError(CheckpointError):
    """The keys and shapes of a checkpoint match no model family sfumato knows."""


class InvalidParameterError(SfumatoError, ValueError):
    """A generation parameter is out of range or of the wrong kind."""
