"""Pages of mapped weights: release an idle component's weights from RAM, bring them back when it runs.

Weights loaded with ``Checkpoint.get(share=True)`` live in a private, copy-on-write map of the checkpoint
file. Their pages can leave the process (``MADV_DONTNEED``) at no risk while they are unchanged copies of
the file: the next touch maps them again from the page cache (or the disk). A page the process has
written to (an in-place change of a weight) is an anonymous copy, and dropping it would lose the change;
so before releasing, ``/proc/self/pagemap`` is read and only present, file-backed pages are released.
Where the system has no pagemap or no ``madvise``, nothing is released (and nothing is lost).

:func:`idle_release` is the memory mode ``MemoryOptions.offload`` on the CPU: of the pipeline's components
(text encoders, UNet, autoencoder, extras), only the one running keeps its mapped pages, so the peak
resident memory is that of the largest component plus activations instead of the sum. ``sequential``:
within the running component too, each layer group (:func:`units`) maps its pages in before it runs and
releases them after, so only one group is resident at a time. Tensors that are not mapped (converted
dtypes, LoRA-patched weights, ``.ckpt`` files) stay resident.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import weakref
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

__all__ = ["register_map", "release", "release_tensors", "populate", "resident_bytes", "units", "idle_release"]

_PAGE = mmap.PAGESIZE
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
_MAPS: list[tuple[weakref.ref, int, int]] = []  # (map, base address, length) of live weight maps


def register_map(m: mmap.mmap) -> None:
    """Note a checkpoint map whose tensors :func:`release` may page out."""
    buf = ctypes.c_char.from_buffer(m)
    base = ctypes.addressof(buf)
    del buf  # the address stays valid as long as the map lives; the export must not keep it open
    _MAPS[:] = [e for e in _MAPS if e[0]() is not None]
    _MAPS.append((weakref.ref(m), base, len(m)))


def _ranges(tensors: Iterable[torch.Tensor]) -> Iterator[tuple[mmap.mmap, int, int]]:
    """(map, page-aligned offset, length) of the whole pages inside each mapped tensor."""
    seen = set()
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        ptr, n = t.data_ptr(), t.numel() * t.element_size()
        if ptr in seen:
            continue
        seen.add(ptr)
        for ref, base, length in _MAPS:
            m = ref()
            if m is not None and base <= ptr and ptr + n <= base + length:
                first = -(-(ptr - base) // _PAGE) * _PAGE
                last = (ptr - base + n) // _PAGE * _PAGE
                if last > first:
                    yield m, first, last - first
                break


def _file_pages(address: int, length: int) -> list[tuple[int, int]] | None:
    """Runs (start, length) of present, file-backed pages in [address, address + length), or None when
    the pagemap cannot be read."""
    import numpy as np

    n = length // _PAGE
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(address // _PAGE * 8)
            raw = f.read(n * 8)
    except OSError:
        return None
    if len(raw) != n * 8:
        return None
    flags = np.frombuffer(raw, dtype=np.uint64)
    ok = ((flags >> np.uint64(63)) & np.uint64(1)).astype(bool) & ((flags >> np.uint64(61)) & np.uint64(1)).astype(bool)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], ok.astype(np.int8), [0]])))
    return [(int(a) * _PAGE, int(b - a) * _PAGE) for a, b in zip(edges[::2], edges[1::2])]


def release(module: nn.Module) -> int:
    """Drop the module's mapped, unchanged weight pages from this process; returns the bytes released."""
    return release_tensors([*module.parameters(), *module.buffers()])


def release_tensors(tensors: Iterable[torch.Tensor]) -> int:
    """Drop these tensors' mapped, unchanged pages from this process (any tensor not mapped from a
    checkpoint is left alone); returns the bytes released."""
    released = 0
    for m, offset, length in _ranges(tensors):
        base = next(b for r, b, _ in _MAPS if r() is m)
        runs = _file_pages(base + offset, length)
        if runs is None:
            return released
        for start, size in runs:
            try:
                m.madvise(mmap.MADV_DONTNEED, offset + start, size)
            except (OSError, ValueError, AttributeError):
                return released
            released += size
    return released


def populate(module: nn.Module, skip: Callable[[torch.Tensor], bool] | None = None) -> None:
    """Map the module's weight pages back in one call per tensor (instead of a fault per page); not those of
    tensors ``skip`` names (weights the running path does not read)."""
    tensors = [*module.parameters(), *module.buffers()]
    for m, offset, length in _ranges([t for t in tensors if skip is None or not skip(t)]):
        try:
            m.madvise(_MADV_POPULATE_READ, offset, length)
        except (OSError, ValueError, AttributeError):
            return


def resident_bytes(module: nn.Module) -> tuple[int, int]:
    """(resident, total) bytes of the module's mapped weight pages (for tests and benchmarks)."""
    import numpy as np

    resident = total = 0
    for m, offset, length in _ranges([*module.parameters(), *module.buffers()]):
        base = next(b for r, b, _ in _MAPS if r() is m)
        total += length
        with open("/proc/self/pagemap", "rb") as f:
            f.seek((base + offset) // _PAGE * 8)
            flags = np.frombuffer(f.read(length // _PAGE * 8), dtype=np.uint64)
        resident += int(((flags >> np.uint64(63)) & np.uint64(1)).sum()) * _PAGE
    return resident, total


# sequential offload's layer group: about this many bytes of weights (SD 1.5's UNet: about 60 groups)
UNIT_BYTES = 64 << 20


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def units(module: nn.Module, budget: int | None = None) -> list[nn.Module]:
    """The layer groups of ``module`` for sequential offload: the largest submodules of at most ``budget``
    bytes of weights (a bigger leaf is a group of its own), descending into containers that are never
    called themselves (``ModuleList``, ``ModuleDict``), so every group's forward runs through its hooks.
    Weights a module holds directly, outside any group, stay with the component. ``budget``: default
    :data:`UNIT_BYTES`."""
    budget = UNIT_BYTES if budget is None else budget
    called = not isinstance(module, (nn.ModuleList, nn.ModuleDict))
    children = list(module.children())
    size = _bytes(module)
    if called and (not children or size <= budget):
        return [module] if size else []
    return [u for c in children for u in units(c, budget)]


@contextlib.contextmanager
def idle_release(components: Iterable[nn.Module], *, sequential: bool = False,
                 skip: Callable[[torch.Tensor], bool] | None = None) -> Iterator[dict]:
    """Within the block, calling into one of ``components`` (its forward or any direct child's) releases
    the mapped pages of the one that ran before and maps its own back: one component resident at a time.
    ``sequential``: the component's pages are not mapped back at once; each of its :func:`units` maps its
    own in before its forward and releases them after. ``skip``: tensors not mapped in ahead (float weights
    int8 has packed; any that a call does read fault in as usual). Yields a record of the switches (for
    tests)."""
    components = [c for c in components if c is not None]
    state: dict = {"active": None, "switches": []}

    def enter(component: nn.Module) -> None:
        if state["active"] is component:
            return
        if state["active"] is not None:
            release(state["active"])
        if not sequential:
            populate(component, skip)
        state["active"] = component
        state["switches"].append(type(component).__name__)

    def unit_done(unit: nn.Module, _args, _out) -> None:  # noqa: ANN001 - a forward hook; None keeps the output
        release(unit)

    hooks = []
    for c in components:
        for m in (c, *c.children()):
            hooks.append(m.register_forward_pre_hook(lambda _m, _a, c=c: enter(c)))
        if sequential:
            for u in units(c):
                hooks.append(u.register_forward_pre_hook(lambda u, _a: populate(u, skip)))
                hooks.append(u.register_forward_hook(unit_done))
    for c in components:
        release(c)  # each comes back when it first runs
    try:
        yield state
    finally:
        for h in hooks:
            h.remove()
