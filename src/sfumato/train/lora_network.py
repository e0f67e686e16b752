"""Trainable LoRA modules (Hu et al. 2021) injected into a loaded pipeline, and their kohya / PEFT files.

``inject(pipe, rank, alpha, conv=..., text_encoder=...)`` wraps every target layer in a :class:`LoRALayer`:
``y = base(x) + (alpha / rank) * up(down(x))``, ``down`` Kaiming-initialised and ``up`` zero (so training
starts from the unchanged model, as kohya and PEFT do); a Conv2d gets a k x k ``down`` conv and a 1x1 ``up``
(kohya's "LoCon"). Targets, as kohya's ``networks/lora.py`` picks them: every Linear inside the UNet's
transformer blocks (attention q/k/v/out, feed-forward, linear proj_in/out), with ``conv`` also the 3x3
convs of the res blocks and up/downsamplers; with ``text_encoder`` the Linear layers of every CLIP text
encoder layer (attention and MLP).

``kohya_state_dict`` writes AUTOMATIC1111/kohya names (``lora_unet_<module>`` with the UNet module named as
diffusers names it for SD 1.x/2.x, as the LDM checkpoint names it for SDXL base and refiner, as kohya does;
``lora_te_`` / ``lora_te1_``/``lora_te2_``), each with ``.lora_down.weight``, ``.lora_up.weight`` and
``.alpha``; ``peft_state_dict`` writes diffusers' ``unet.<module>.lora_A.weight`` / ``lora_B.weight``
(+ ``.alpha``). Both load back through :mod:`sfumato.adapters.lora`, which is how the trainer checks them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["LoRALayer", "LoRATargets", "inject", "remove", "kohya_state_dict", "peft_state_dict"]


class LoRALayer(nn.Module):
    """``base`` (frozen) plus a low-rank update of scale ``alpha / rank``."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.base, self.rank, self.alpha = base, rank, float(alpha)
        base.requires_grad_(False)
        dev, dtype = "cpu", torch.float32  # drawn on the CPU (the generator's device), then moved to base's
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False, device=dev, dtype=dtype)
            self.up = nn.Linear(rank, base.out_features, bias=False, device=dev, dtype=dtype)
        else:
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False,
                                  device=dev, dtype=dtype)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False, device=dev, dtype=dtype)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.up.weight)
        self.down.to(base.weight.device)
        self.up.to(base.weight.device)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (self.up(self.down(x.to(self.down.weight.dtype))) * self.scale).to(x.dtype)


@dataclass(frozen=True)
class LoRATargets:
    """Where the layers went: module path below the pipeline (``unet.<name>`` / ``text_encoders.<i>.<name>``)
    -> the injected layer."""

    layers: dict[str, LoRALayer]
    kohya_names: dict[str, str]  # path -> kohya / AUTOMATIC1111 module name
    peft_names: dict[str, str]  # path -> diffusers / PEFT module name

    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.down.weight, layer.up.weight)]


_OUTER_CONVS = ("input_blocks.0.0", "out.2")  # conv_in / conv_out: not in kohya's LoCon targets


def _targets(pipe, conv: bool, text_encoder: bool) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(path, parent module, attribute, layer) of every layer to wrap."""
    from sfumato.models.unet import SpatialTransformer

    found: list[tuple[str, nn.Module, str, nn.Module]] = []
    roots: list[tuple[str, nn.Module]] = [("unet", pipe.unet)]
    if text_encoder:
        roots += [(f"text_encoders.{i}", e) for i, e in enumerate(pipe.text_encoders)]
    for root_name, root in roots:
        inside: set[str] = set()
        if root is pipe.unet:
            inside = {n for n, m in root.named_modules() if isinstance(m, SpatialTransformer)}
        for name, parent in root.named_modules():
            for attr, child in parent.named_children():
                path = f"{name}.{attr}" if name else attr
                if isinstance(child, LoRALayer):
                    raise ValueError(f"{root_name}.{path} already has a LoRA layer")
                if root is pipe.unet:
                    in_transformer = any(path.startswith(t + ".") for t in inside)
                    ok = (isinstance(child, nn.Linear) and in_transformer) or (
                        conv and isinstance(child, nn.Conv2d) and child.kernel_size == (3, 3)
                        and path not in _OUTER_CONVS)
                else:
                    ok = isinstance(child, nn.Linear) and path.startswith("text_model.encoder.layers.")
                if ok:
                    found.append((f"{root_name}.{path}", parent, attr, child))
    return found


def inject(pipe, rank: int, alpha: float | None = None, *, conv: bool = False,
           text_encoder: bool = False, seed: int = 0) -> LoRATargets:
    """Wrap the target layers of ``pipe`` in :class:`LoRALayer` (``alpha`` None: the rank, a scale of 1);
    the ``down`` weights are drawn from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    alpha = float(rank if alpha is None else alpha)
    kohya, peft = _file_names(pipe)
    layers: dict[str, LoRALayer] = {}
    for path, parent, attr, child in _targets(pipe, conv, text_encoder):
        layer = LoRALayer(child, rank, alpha, g)
        setattr(parent, attr, layer)
        layers[path] = layer
    return LoRATargets(layers, {p: kohya[p] for p in layers}, {p: peft[p] for p in layers})


def remove(pipe, targets: LoRATargets) -> None:
    """Put the original layers back (the LoRA weights are dropped from the model, not merged)."""
    for path, layer in targets.layers.items():
        root, _, rest = path.partition(".")
        if root == "text_encoders":
            i, _, rest = rest.partition(".")
            module: nn.Module = pipe.text_encoders[int(i)]
        else:
            module = pipe.unet
        parent_path, _, attr = rest.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        setattr(parent, attr, layer.base)


def _file_names(pipe) -> tuple[dict[str, str], dict[str, str]]:
    """Module path below the pipeline -> (kohya name, PEFT name), read from the adapter loader's own name
    table (so every name written is one it reads back). Called before injection."""
    from sfumato.adapters.lora import _module_names

    ldm_unet_names = pipe.spec.size_conditioning is not None  # kohya's SDXL files use the checkpoint's names
    kohya: dict[str, list[str]] = {}
    peft: dict[str, list[str]] = {}
    for name, path in _module_names(pipe).items():
        (peft if "." in name else kohya).setdefault(path, []).append(name)

    def pick_kohya(path: str, names: list[str]) -> str:
        if path.startswith("unet."):
            ldm = f"lora_unet_{path[len('unet.'):].replace('.', '_')}"
            other = [n for n in names if n != ldm]
            return ldm if ldm_unet_names or not other else other[0]
        te1 = [n for n in names if n.startswith("lora_te1_")]
        return te1[0] if te1 and len(pipe.text_encoders) > 1 else names[0]

    def pick_peft(names: list[str]) -> str:
        full = [n for n in names if n.startswith("unet.") or ".text_model." in n]
        return full[0] if full else names[0]

    return ({p: pick_kohya(p, n) for p, n in kohya.items()}, {p: pick_peft(n) for p, n in peft.items()})


def kohya_state_dict(targets: LoRATargets) -> dict[str, Tensor]:
    """The LoRA in AUTOMATIC1111 / kohya layout (fp32 tensors, alpha as a 0-d tensor)."""
    names = targets.kohya_names
    out: dict[str, Tensor] = {}
    for path, layer in targets.layers.items():
        n = names[path]
        out[f"{n}.lora_down.weight"] = layer.down.weight.detach().float().cpu().contiguous()
        out[f"{n}.lora_up.weight"] = layer.up.weight.detach().float().cpu().contiguous()
        out[f"{n}.alpha"] = torch.tensor(layer.alpha)
    return out


def peft_state_dict(targets: LoRATargets) -> dict[str, Tensor]:
    """The LoRA in diffusers / PEFT layout (``lora_A`` = down, ``lora_B`` = up)."""
    names = targets.peft_names
    out: dict[str, Tensor] = {}
    for path, layer in targets.layers.items():
        n = names[path]
        out[f"{n}.lora_A.weight"] = layer.down.weight.detach().float().cpu().contiguous()
        out[f"{n}.lora_B.weight"] = layer.up.weight.detach().float().cpu().contiguous()
        out[f"{n}.alpha"] = torch.tensor(layer.alpha)
    return out
