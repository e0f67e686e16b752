"""Add-ons applied to a loaded pipeline: LoRA and LyCORIS (``lora``), textual inversion (``embeddings``),
ControlNet (``controlnet``)."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

T = TypeVar("T")


def pipe_state(pipe: Any, attr: str, factory: Callable[[], T]) -> T:
    """The add-on state kept on ``pipe`` under ``attr``, made by ``factory`` on first use."""
    state = getattr(pipe, attr, None)
    if state is None:
        state = factory()
        setattr(pipe, attr, state)
    return state
