"""Find a causal LM's decoder blocks, their linear layers, and which linears share one input.

Blocks are the longest ``nn.ModuleList`` whose items hold linear layers. Fused input
groups (q/k/v, gate/up) are found by running one tiny forward pass and grouping the
linears of a block that receive the very same input tensor, so any architecture whose
layers share inputs is handled, not only names we know.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn


@attrs.define
class BlockInfo:
    index: int
    prefix: str  # e.g. "model.layers.3"
    linears: dict  # relative name -> (out_features, in_features), in execution order
    groups: list  # lists of relative names sharing one input, in execution order


@attrs.define
class Inspection:
    model_type: str
    blocks_path: str
    blocks: list
    n_params: int
    hidden_size: int

    def linear_names(self) -> list[str]:
        return [f"{b.prefix}.{n}" for b in self.blocks for n in b.linears]

    def group_of(self, name: str) -> list[str]:
        for b in self.blocks:
            for g in b.groups:
                if any(f"{b.prefix}.{n}" == name for n in g):
                    return [f"{b.prefix}.{n}" for n in g]
        raise KeyError(name)

    def summary(self) -> dict:
        b0 = self.blocks[0]
        return {
            "model_type": self.model_type,
            "parameters": self.n_params,
            "hidden_size": self.hidden_size,
            "blocks": len(self.blocks),
            "blocks_path": self.blocks_path,
            "linears_per_block": {n: list(s) for n, s in b0.linears.items()},
            "fused_groups": b0.groups,
        }


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear, or a drop-in for one (a QuantLinear of a loaded checkpoint)."""
    return isinstance(module, nn.Linear) or (
        isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int))


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder block list: the longest ModuleList whose items contain linear layers."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and any(is_linear(m) for m in mod[0].modules()):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ValueError(f"{type(model).__name__}: found no list of decoder blocks with linear layers")
    return best


def inspect_model(model: nn.Module) -> Inspection:
    """Blocks, linears and fused groups of ``model`` (one forward pass over 4 tokens)."""
    path, blocks = find_blocks(model)
    seen: dict[str, list] = {}
    order: list[str] = []
    hooks = []
    for bi, block in enumerate(blocks):
        for rel, mod in block.named_modules():
            if is_linear(mod):
                full = f"{bi}|{rel}"

                def hook(m, args, _full=full):
                    if _full not in seen:
                        seen[_full] = args[0]  # kept alive so no id is reused
                        order.append(_full)

                hooks.append(mod.register_forward_pre_hook(hook))
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3, 4]], device=device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    infos = []
    for bi, block in enumerate(blocks):
        rels = [k.split("|", 1)[1] for k in order if k.startswith(f"{bi}|")]
        linears = {}
        for rel in rels:
            mod = block.get_submodule(rel)
            linears[rel] = (mod.out_features, mod.in_features)
        groups: list[list[str]] = []
        by_input: dict = {}
        for rel in rels:
            key = id(seen[f"{bi}|{rel}"])
            if key in by_input:
                by_input[key].append(rel)
            else:
                by_input[key] = [rel]
                groups.append(by_input[key])
        infos.append(BlockInfo(bi, f"{path}.{bi}" if path else str(bi), linears, groups))
    cfg = getattr(model, "config", None)
    return Inspection(
        model_type=getattr(cfg, "model_type", type(model).__name__),
        blocks_path=path,
        blocks=infos,
        n_params=sum(p.numel() for p in model.parameters()) +
        sum(m.in_features * m.out_features for m in model.modules() if is_linear(m) and not isinstance(m, nn.Linear)),
        hidden_size=getattr(cfg, "hidden_size", 0),
    )
